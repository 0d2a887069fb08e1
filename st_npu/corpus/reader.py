"""A corpus read as a stream of rows, in shards: ``.txt`` and ``.jsonl`` through :mod:`st_npu.files.inputs`, ``.parquet``,
``.csv`` and ``.tsv`` through pyarrow, in batches; a folder or a glob is its files in sorted order. Every file is a
:class:`~st_npu.corpus.storage.Location`: on disk or on an object store, read the same way.

Row i of the input (counted over all its files, from 0) is row i everywhere: a blank line is a row (the text
``""``) unless ``skip_empty``, and an id defaults to the row number. Shard k holds the rows ``k * shard_size`` to
``(k + 1) * shard_size`` of the input, so a rerun cuts the same shards whatever was done before. A bad row raises
:class:`InputError` naming the file, the line or row, and the problem; with ``on_bad_row="skip"`` it is handed
to the caller as a :class:`Reject` instead.

The local engine streams every shard in order (:func:`shards`). The Ray engine reads each shard where it is
embedded (:func:`read_shard`), from a :class:`ShardPlan` cut from the files' row counts (:func:`count_file`,
with the byte offset of every ``CHECKPOINT_ROWS``-th line of a text file, so a shard is read without
re-reading the file before it).
"""

from __future__ import annotations

import glob
import hashlib
import io
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from st_npu.corpus import storage
from st_npu.corpus.storage import Location
from st_npu.errors import UsageError
from st_npu.files.inputs import JSONL_SUFFIXES, InputError, Line, decode, field_text, json_record

LINE_SUFFIXES = (".txt", ".jsonl", ".ndjson")
COLUMN_SUFFIXES = (".parquet", ".csv", ".tsv")
SUFFIXES = LINE_SUFFIXES + COLUMN_SUFFIXES
ARROW_BATCH_ROWS = 8192
PYARROW_HINT = 'st-npu embed-corpus reads and writes Parquet through pyarrow: pip install "st-npu[corpus]"'
CHECKPOINT_ROWS = 4096
READ_BUFFER = 1 << 20
_BOM = b"\xef\xbb\xbf"


class MissingExtra(UsageError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


@dataclass(frozen=True)
class Fields:
    """Which fields of a record are read: the text, an optional id, and columns kept beside the embedding."""

    text: str = "text"
    id: str | None = None
    keep: tuple[str, ...] = ()

    def needed(self) -> list[str]:
        return list(dict.fromkeys([self.text, *([self.id] if self.id else []), *self.keep]))


@dataclass(frozen=True)
class Reject:
    """A bad row: its number in the input, where it is (file and line or row), and what is wrong with it."""

    row: int
    where: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Shard:
    """Rows ``start`` to ``end`` of the input, as columns: the rows embedded and the rejects among them."""

    index: int
    start: int
    end: int
    rows: list[int] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    keep: dict[str, list[Any]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    empty_skipped: int = 0


def pyarrow_modules() -> tuple[Any, Any, Any]:
    """``pyarrow``, ``pyarrow.parquet`` and ``pyarrow.csv``, or an ImportError with the install hint."""
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError:
        raise MissingExtra(PYARROW_HINT) from None
    return pyarrow, pyarrow.parquet, pyarrow.csv


def input_files(source: Location) -> list[Location]:
    """The files of an input: one file, the supported files under a folder, or a glob's matches, sorted."""
    from pyarrow.fs import FileType

    if glob.has_magic(source.path):
        files = storage.glob_files(source)
    else:
        kind = storage.info(source).type
        if kind == FileType.Directory:
            files = [source.child(name) for name in storage.files_under(source)
                     if posixpath.splitext(name)[1].lower() in SUFFIXES
                     and not any(part.startswith(".") for part in name.split("/"))]
        elif kind == FileType.File:
            files = [source]
        else:
            raise InputError(f"{source}: no such file or folder{_missing_bucket(source)}")
    if not files:
        raise InputError(f"{source}: no input files (expected {', '.join(SUFFIXES)})")
    unsupported = [str(path) for path in files if path.suffix not in SUFFIXES]
    if unsupported:
        raise InputError(f"{unsupported[0]}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return files


def _missing_bucket(source: Location) -> str:
    from pyarrow.fs import FileType

    bucket = source.path.split("/")[0]
    if not source.is_object_store or storage.info(Location(source.filesystem, bucket, bucket)).type != FileType.NotFound:
        return ""
    return f" (there is no bucket {bucket!r})"


def fingerprint(files: Sequence[Location]) -> list[dict[str, Any]]:
    """Each file's name, size and sha256: what the manifest compares to refuse mixing two inputs."""
    root = posixpath.commonpath([posixpath.dirname(location.path) for location in files])
    entries = []
    for location in files:
        digest, size = hashlib.sha256(), 0
        with storage.open_input(location) as handle:
            while chunk := handle.read(READ_BUFFER):
                digest.update(chunk)
                size += len(chunk)
        entries.append({"path": posixpath.relpath(location.path, root), "bytes": size, "sha256": digest.hexdigest()})
    return entries


def row_count(files: Sequence[Location]) -> int | None:
    """Rows in the input when cheap to know (lines of text files, Parquet metadata), for the progress bar's ETA."""
    total = 0
    for location in files:
        if location.suffix in LINE_SUFFIXES:
            with storage.open_input(location) as handle:
                count, last = 0, b"\n"
                while chunk := handle.read(READ_BUFFER):
                    count, last = count + chunk.count(b"\n"), chunk[-1:]
            total += count + (last != b"\n")
        elif location.suffix == ".parquet":
            total += _parquet(location).metadata.num_rows
        else:
            return None  # a CSV row may span lines: its count needs a full parse
    return total


def shards(files: Sequence[Location], fields: Fields, shard_size: int, skip_empty: bool = False,
           skip_bad_rows: bool = False, unique_ids: bool = True) -> Iterator[Shard]:
    """The input's shards in order; an input without a single row is an error, and so is an id given twice
    (by ``fields.id``) unless ``unique_ids`` is false."""
    shard = Shard(0, 0, shard_size)
    first_row: dict[Any, int] | None = {} if fields.id is not None and unique_ids else None
    seen = 0
    for row, record in enumerate(_records(files, fields)):
        seen = row + 1
        if row >= shard.end:
            yield shard
            shard = Shard(shard.index + 1, shard.end, shard.end + shard_size)
        if _add(shard, row, record, fields, skip_empty, skip_bad_rows) and first_row is not None:
            identity = shard.ids[-1]
            first = first_row.setdefault(identity, row)
            if first != row:
                raise duplicate_id(record[3], identity, first, row)
    if not seen:
        raise InputError(f"{', '.join(map(str, files))}: the input is empty (no rows)")
    shard.end = seen
    yield shard


def duplicate_id(where: str, identity: Any, first: int, row: int) -> InputError:
    """The error of an id given twice, at row ``first`` and at row ``row`` (found at ``where``)."""
    return InputError(f"{where}: id {identity!r} is also the id of row {first} (rows count from 0 over the whole "
                      f"input; this is row {row}); ids must be unique, or pass --on-duplicate-id keep")


def _add(shard: Shard, row: int, record: Record, fields: Fields, skip_empty: bool, skip_bad_rows: bool) -> bool:
    """Put one record into its shard; whether it is embedded (not a reject, not a skipped blank)."""
    if isinstance(record, Reject):
        if not skip_bad_rows:
            raise InputError(record.message)
        shard.rejects.append(record)
        return False
    text, identity, kept, _ = record
    if skip_empty and not text.strip():
        shard.empty_skipped += 1
        return False
    shard.rows.append(row)
    shard.ids.append(row if fields.id is None else identity)
    shard.texts.append(text)
    for name in fields.keep:
        shard.keep.setdefault(name, []).append(kept[name])
    return True


@dataclass(frozen=True)
class FileRows:
    """A file's row count, and for a text file the byte offset of lines 0, CHECKPOINT_ROWS, 2 * CHECKPOINT_ROWS..."""

    path: Location
    rows: int
    checkpoints: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShardPlan:
    """Where shard ``index`` (input rows ``start`` to ``end``) lies: per file, its path, its first input row, the
    file's rows ``(first, last)`` the shard takes, and where to start reading (the byte offset of a text file's
    checkpoint line at or before ``first``, and that line's number from 0; zeros for other files)."""

    index: int
    start: int
    end: int
    parts: tuple[tuple[Location, int, int, int, tuple[int, int]], ...]


def count_file(path: Location, fields: Fields) -> FileRows:
    """One file's rows: Parquet metadata, newlines of a text file (noting checkpoints), or a CSV parse."""
    if path.suffix in LINE_SUFFIXES:
        checkpoints, rows, offset = [], 0, 0
        with storage.open_input(path) as raw:
            for line in io.BufferedReader(raw, READ_BUFFER):
                if rows % CHECKPOINT_ROWS == 0:
                    checkpoints.append(offset)
                rows, offset = rows + 1, offset + len(line)
        return FileRows(path, rows, tuple(checkpoints))
    if path.suffix == ".parquet":
        return FileRows(path, _parquet(path).metadata.num_rows)
    return FileRows(path, sum(batch.num_rows for batch in _arrow_batches(path, Fields(fields.text))))


def plan_shards(counts: Sequence[FileRows], shard_size: int) -> list[ShardPlan]:
    """Every shard of the input, cut from its files' row counts as :func:`shards` cuts the stream."""
    total = sum(count.rows for count in counts)
    if not total:
        raise InputError(f"{', '.join(str(count.path) for count in counts)}: the input is empty (no rows)")
    firsts = [sum(count.rows for count in counts[:position]) for position in range(len(counts))]
    plans = []
    for index, start in enumerate(range(0, total, shard_size)):
        end = min(start + shard_size, total)
        parts = tuple(_part(count, first, max(start - first, 0), min(end - first, count.rows))
                      for count, first in zip(counts, firsts) if first < end and first + count.rows > start)
        plans.append(ShardPlan(index, start, end, parts))
    return plans


def place(counts: Sequence[FileRows], row: int) -> str:
    """Where input row ``row`` is: its file, and its line (text files) or row (columnar files), from 1."""
    for count in counts:
        if row < count.rows:
            return f"{count.path}: {'line' if count.path.suffix in LINE_SUFFIXES else 'row'} {row + 1}"
        row -= count.rows
    raise IndexError(row)


def _part(count: FileRows, first_row: int, first: int, last: int) -> tuple[Location, int, int, int, tuple[int, int]]:
    if not count.checkpoints:
        return count.path, first_row, first, last, (0, 0)
    checkpoint = min(first // CHECKPOINT_ROWS, len(count.checkpoints) - 1)
    return count.path, first_row, first, last, (count.checkpoints[checkpoint], checkpoint * CHECKPOINT_ROWS)


def read_shard(plan: ShardPlan, fields: Fields, skip_empty: bool = False, skip_bad_rows: bool = False) -> Shard:
    """The rows of one planned shard, as :func:`shards` would give them."""
    shard = Shard(plan.index, plan.start, plan.end)
    for path, first_row, first, last, seek in plan.parts:
        if path.suffix in LINE_SUFFIXES:
            records, skip = _line_records(path, fields, first_row, start=seek), first - seek[1]
        else:
            records, skip = _column_records(path, fields, first_row, first), first - _skipped_rows(path, first)
        for offset, record in enumerate(islice(records, skip, skip + last - first)):
            _add(shard, first_row + first + offset, record, fields, skip_empty, skip_bad_rows)
    return shard


# Each record is (text, id, kept columns, where) or a Reject; the row number is its position in this stream.
Record = tuple[str, Any, dict[str, Any], str] | Reject


def _records(files: Sequence[Location], fields: Fields) -> Iterator[Record]:
    row = 0
    for path in files:
        reader = _line_records if path.suffix in LINE_SUFFIXES else _column_records
        for record in reader(path, fields, row):
            row += 1
            yield record


def _line_records(path: Location, fields: Fields, first_row: int, start: tuple[int, int] = (0, 0)) -> Iterator[Record]:
    """The records of a text file, from ``start``: a byte offset where a line begins and the lines before it."""
    jsonl = path.suffix in JSONL_SUFFIXES
    if not jsonl and (fields.id or fields.keep):
        raise InputError(f"{path}: a .txt file has no fields; --id-field and --keep need .jsonl, .parquet or .csv")
    for line in _lines(path, *start):
        where = f"{path}: line {line.number}"
        try:
            if not jsonl:
                yield decode(line, path), None, {}, where
                continue
            record = json_record(line, path)
            identity = _identity(record, fields.id, where) if fields.id else None
            yield (field_text(record, fields.text, where), identity, {name: record.get(name) for name in fields.keep},
                   where)
        except InputError as exc:
            # The messages of st_npu.files.inputs start with the file and line; a reject keeps them apart.
            reason = str(exc).removeprefix(where).removeprefix(":").strip()
            yield Reject(first_row + line.number - 1, where, reason)


def _lines(path: Location, offset: int, before: int) -> Iterator[Line]:
    """Lines from byte ``offset`` (line ``before`` + 1 starts there); a byte-order mark opening the file is dropped."""
    with storage.open_input(path) as handle:
        handle.seek(offset)
        for number, raw in enumerate(io.BufferedReader(handle, READ_BUFFER), start=before + 1):
            start = offset
            offset += len(raw)
            if start == 0 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM):], len(_BOM)
            yield Line(number, raw.rstrip(b"\n").removesuffix(b"\r"), start)


def _identity(record: dict[str, Any], field_name: str, where: str) -> Any:
    value = record.get(field_name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: id field {field_name!r} is {value!r:.40}, expected a string or an integer")
    return value


def _column_records(path: Location, fields: Fields, first_row: int, start: int = 0) -> Iterator[Record]:
    """The records of a Parquet or CSV file from about row ``start``: whole Parquet row groups before it are not
    read; the first record's row is ``first_row`` plus the rows passed over (see :func:`_skipped_rows`)."""
    number = _skipped_rows(path, start)
    for batch in _arrow_batches(path, fields, number):
        columns = {name: batch.column(name).to_pylist() for name in fields.needed()}
        for offset in range(batch.num_rows):
            number += 1
            where = f"{path}: row {number}"
            text = columns[fields.text][offset]
            if not isinstance(text, str):
                yield Reject(first_row + number - 1, where, f"column {fields.text!r} is {text!r:.40}, expected a string")
                continue
            identity = columns[fields.id][offset] if fields.id else None
            if fields.id and (isinstance(identity, bool) or not isinstance(identity, (str, int))):
                yield Reject(first_row + number - 1, where,
                             f"id column {fields.id!r} is {identity!r:.40}, expected a string or an integer")
                continue
            yield text, identity, {name: columns[name][offset] for name in fields.keep}, where


def _skipped_rows(path: Location, start: int) -> int:
    """Rows of the Parquet row groups that end before row ``start`` (a CSV file is read from its first row)."""
    if not start or path.suffix != ".parquet":
        return 0
    metadata, skipped = _parquet(path).metadata, 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if skipped + rows > start:
            break
        skipped += rows
    return skipped


def _parquet(path: Location) -> Any:
    return pyarrow_modules()[1].ParquetFile(storage.open_input(path))


def _arrow_batches(path: Location, fields: Fields, skipped: int = 0) -> Iterator[Any]:
    pyarrow, parquet, csv = pyarrow_modules()
    needed = fields.needed()
    try:
        if path.suffix == ".parquet":
            handle = _parquet(path)
            _check_columns(path, needed, handle.schema_arrow.names)
            groups, rows = [], 0
            for group in range(handle.metadata.num_row_groups):
                if rows >= skipped:
                    groups.append(group)
                rows += handle.metadata.row_group(group).num_rows
            yield from handle.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=needed, row_groups=groups)
            return
        delimiter = "\t" if path.suffix == ".tsv" else ","
        header = csv.open_csv(storage.open_input(path), parse_options=csv.ParseOptions(delimiter=delimiter))
        _check_columns(path, needed, header.schema.names)
        header.close()
        # Every column as a string: a text "123" or an id "007" must not turn into a number.
        reader = csv.open_csv(storage.open_input(path), parse_options=csv.ParseOptions(delimiter=delimiter),
                              convert_options=csv.ConvertOptions(include_columns=needed, strings_can_be_null=False,
                                                                 column_types={name: pyarrow.string() for name in needed}),
                              read_options=csv.ReadOptions(block_size=1 << 20))
        yield from reader
    except pyarrow.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot be read as {path.suffix.lstrip('.')}: {exc}") from None


def _check_columns(path: Location, needed: list[str], present: list[str]) -> None:
    missing = [name for name in needed if name not in present]
    if missing:
        raise InputError(f"{path} has no column {missing[0]!r} (columns: {', '.join(map(repr, present[:12]))}); "
                         f"choose one with --text-field, --id-field or --keep")

