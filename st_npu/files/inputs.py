"""Texts to embed from a file or standard input, read as a stream: plain text (one text per line) and JSON lines.

Row i of the input is always row i of the output: a blank line of a text file is the text ``""``, never skipped,
so vectors cannot shift against their lines. A problem raises :class:`InputError` naming the file, the line and
what is wrong (invalid UTF-8 with its byte offset, malformed JSON, a missing field, a text that is not a string).
``st-npu embed`` reads whole files through :func:`read_texts`; the corpus job streams the same records.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

STDIN = "-"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Tabular formats need a column name and pyarrow: the corpus job reads them, `st-npu embed` does not.
TABULAR_SUFFIXES = (".parquet", ".csv", ".tsv", ".json")
DEFAULT_TEXT_FIELD = "text"
_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """An input file that cannot be read as texts; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Line:
    """One line of a file: its number (from 1), its bytes without the line ending, and where it starts."""

    number: int
    raw: bytes
    offset: int


def display_name(source: str | Path) -> str:
    return "<stdin>" if str(source) == STDIN else str(source)


def is_jsonl(source: str | Path) -> bool:
    return Path(str(source)).suffix.lower() in JSONL_SUFFIXES


def lines(source: str | Path) -> Iterator[Line]:
    """The lines of a file (``-``: standard input), one at a time; a leading UTF-8 byte-order mark is dropped."""
    if str(source) == STDIN:
        yield from _lines_of(sys.stdin.buffer)
        return
    try:
        handle = open(source, "rb")
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source} is a folder; expected a file of texts") from None
    with handle:
        yield from _lines_of(handle)


def _lines_of(handle: BinaryIO) -> Iterator[Line]:
    offset = 0
    for number, raw in enumerate(handle, start=1):
        start = offset
        offset += len(raw)
        if number == 1 and raw.startswith(_BOM):
            raw, start = raw[len(_BOM):], start + len(_BOM)
        yield Line(number, raw.rstrip(b"\n").removesuffix(b"\r"), start)


def decode(line: Line, source: str | Path) -> str:
    """The line as text; invalid UTF-8 names the line and the byte offset in the file."""
    try:
        return line.raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{display_name(source)}: line {line.number} is not valid UTF-8 ({exc.reason} at byte "
                         f"{line.offset + exc.start} of the file)") from None


def json_record(line: Line, source: str | Path) -> dict[str, Any]:
    """One JSON-lines record: a JSON object, or an error naming the line and what is wrong with it."""
    text = decode(line, source)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = "is empty" if not text.strip() else f"is malformed JSON (column {exc.colno}: {exc.msg})"
        raise InputError(f"{display_name(source)}: line {line.number} {problem}") from None
    if not isinstance(record, dict):
        raise InputError(f"{display_name(source)}: line {line.number} holds a JSON {type(record).__name__}, "
                         f"expected an object with a text field")
    return record


def field_text(record: dict[str, Any], field: str, where: str) -> str:
    """``record[field]`` as a text, or an error naming ``where`` (file and line or row) and the problem."""
    if field not in record:
        present = ", ".join(map(repr, list(record)[:8])) or "none"
        raise InputError(f"{where} has no field {field!r} (fields: {present}); choose one with --text-field")
    value = record[field]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} is {type(value).__name__} ({value!r:.40}), expected a string")
    return value


def iter_texts(source: str | Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Each text of a text file (one per line) or a ``.jsonl`` file (its ``text_field``), in order."""
    suffix = Path(str(source)).suffix.lower()
    if suffix in TABULAR_SUFFIXES:
        raise InputError(f"{source}: {suffix} files have columns, not lines: use `st-npu embed-corpus {source} "
                         f"--text-field NAME --output DIR`, or a .txt or .jsonl file")
    for line in lines(source):
        if is_jsonl(source):
            where = f"{display_name(source)}: line {line.number}"
            yield field_text(json_record(line, source), text_field, where)
        else:
            yield decode(line, source)


def read_texts(source: str | Path, text_field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """Every text of ``source`` (see :func:`iter_texts`): row i is line i."""
    return list(iter_texts(source, text_field))
