"""Where a corpus job reads and writes: a plain path, ``file://``, ``s3://`` (AWS, Huawei OBS, MinIO: any
S3-compatible store), ``gs://`` or ``hdfs://``, each through pyarrow's filesystem for it
(``pyarrow.fs.FileSystem.from_uri``), for the local and the Ray engine alike.

Storage options (``endpoint_override=obs.example.com``, ``region=...``, ``scheme=http``) join the URI's query, which
is how pyarrow takes them; credentials come from the store's usual variables (``AWS_ACCESS_KEY_ID``...) or
configuration. A :class:`Location` shows itself (in messages, summaries) without credentials or options.

Object stores have no atomic rename: :func:`atomic_write` writes a temporary key and copies it into place, so a
key appears complete or not at all, and :func:`remove_temporaries` clears what a killed job left behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from st_npu.errors import UsageError

# Temporary keys start with a dot, so Parquet readers skip them as they skip hidden files.
TEMPORARY = ".st-npu-tmp-"
# Stores without folders: a "folder" is a key prefix, made by writing under it.
OBJECT_STORES = ("s3", "gcs")
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")


class StorageError(UsageError, OSError):
    """A store that cannot be reached, read or written; the message names the URI."""


@dataclass(frozen=True)
class Location:
    """A file or folder on a pyarrow filesystem; ``uri`` is what messages show (no credentials, no options)."""

    filesystem: Any
    path: str
    uri: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1].lower()

    def child(self, relative: str) -> Location:
        shown = f"{self.uri.rstrip('/')}/{relative}" if self.uri else relative  # a glob relative to the working folder
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{relative}", shown)

    def __str__(self) -> str:
        return self.uri

    @property
    def is_object_store(self) -> bool:
        return self.filesystem.type_name in OBJECT_STORES


def locate(target: str | os.PathLike[str] | Location, options: Mapping[str, str] | None = None) -> Location:
    """The filesystem and path of ``target``; ``options`` go to the store (ignored for local paths)."""
    if isinstance(target, Location):
        return target
    text = os.fspath(target)
    if "://" not in text:
        from pyarrow.fs import LocalFileSystem

        return Location(LocalFileSystem(), os.path.abspath(text), text)
    from pyarrow.fs import FileSystem

    parts = urlsplit(text)
    shown = urlunsplit((parts.scheme, parts.hostname or "" if parts.port is None else f"{parts.hostname}:{parts.port}",
                        parts.path, "", ""))
    query = urlencode([*parse_qsl(parts.query), *(options or {}).items()]) if parts.scheme != "file" else ""
    try:
        filesystem, path = FileSystem.from_uri(urlunsplit(parts._replace(query=query)))
    except Exception as exc:  # ArrowInvalid for an unknown option, OSError for a missing libhdfs or bad endpoint
        said = reason(exc)
        if parts.password:  # a message quoting the URI must not show a secret given in it
            said = said.replace(parts.password, "***")
        raise StorageError(f"{shown}: {said}") from None
    return Location(filesystem, path, shown)


def reason(exc: BaseException) -> str:
    """pyarrow's message in one line, without the request ids of the store."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _REQUEST_ID.sub("", text)


@contextlib.contextmanager
def storage_errors(location: Location) -> Iterator[None]:
    """Any OSError of the store inside the block becomes a one-line :class:`StorageError` naming the URI."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{location}: {reason(exc)}") from None


def info(location: Location) -> Any:
    with storage_errors(location):
        return location.filesystem.get_file_info(location.path)


def is_file(location: Location) -> bool:
    from pyarrow.fs import FileType

    return info(location).type == FileType.File


def files_under(folder: Location) -> list[str]:
    """Every file below ``folder``, as paths relative to it, sorted; none when it does not exist."""
    from pyarrow.fs import FileSelector, FileType

    with storage_errors(folder):
        found = folder.filesystem.get_file_info(FileSelector(folder.path, recursive=True, allow_not_found=True))
    base = folder.path.rstrip("/") + "/"
    return sorted(entry.path.removeprefix(base) for entry in found if entry.type == FileType.File)


def glob_files(pattern: Location) -> list[Location]:
    """The files matching a glob (``*``, ``[...]``, ``**`` for any depth), as :func:`glob.glob` matches on disk:
    ``*`` does not cross ``/`` and does not match a leading dot. On a store, use ``[?]``-free patterns: ``?``
    starts a URI's query."""
    parts = pattern.path.split("/")
    fixed = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    base_path = "/".join(parts[:fixed]) or "/"
    rest = parts[fixed:]
    shown = pattern.uri[:len(pattern.uri) - len("/".join(rest))].rstrip("/")
    base = Location(pattern.filesystem, base_path, shown)
    return [base.child(name) for name in files_under(base) if _matches(rest, name.split("/"))]


def _matches(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[skip:]) for skip in range(len(parts) + 1)
                   if not any(part.startswith(".") for part in parts[:skip]))
    return bool(parts) and (not parts[0].startswith(".") or pattern[0].startswith(".")) and \
        fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def open_input(location: Location) -> Any:
    """A seekable binary reader of a file."""
    with storage_errors(location):
        return location.filesystem.open_input_file(location.path)


def read_bytes(location: Location) -> bytes:
    with open_input(location) as handle:
        return handle.read()


@contextlib.contextmanager
def atomic_write(location: Location) -> Iterator[Any]:
    """A binary stream to a temporary key beside ``location``, moved over it once fully written: a reader sees the
    old file or the new one, never part of one (a move within one folder is a rename on disk and HDFS, a copy of
    one object on a store). On an error the temporary key is removed."""
    filesystem = location.filesystem
    temporary = posixpath.join(posixpath.dirname(location.path), f"{TEMPORARY}{uuid.uuid4().hex[:12]}-{location.name}")
    try:
        with storage_errors(location):
            with filesystem.open_output_stream(temporary) as handle:
                yield handle
            filesystem.move(temporary, location.path)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(temporary)
        raise


def write_bytes(location: Location, data: Any) -> None:
    """Write ``data`` (bytes or a pyarrow buffer) to ``location`` in one piece."""
    with atomic_write(location) as handle:
        handle.write(data)


def delete(location: Location) -> None:
    """Remove a file if it is there."""
    if is_file(location):
        with storage_errors(location):
            location.filesystem.delete_file(location.path)


def prepare_folder(folder: Location) -> None:
    """Make the output folder and prove it writable before any model loads (a missing bucket, a denied write or a
    wrong endpoint shows here): an empty temporary key is written and removed."""
    probe = folder.child(f"{TEMPORARY}write-check")
    with storage_errors(folder):
        if not folder.is_object_store:
            folder.filesystem.create_dir(folder.path, recursive=True)
        with folder.filesystem.open_output_stream(probe.path):
            pass
        folder.filesystem.delete_file(probe.path)


def remove_temporaries(folder: Location) -> None:
    """Remove the temporary keys a killed writer left in ``folder`` (not below it)."""
    for name in files_under(folder):
        if "/" not in name and name.startswith(TEMPORARY):
            delete(folder.child(name))
