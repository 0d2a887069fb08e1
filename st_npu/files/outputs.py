"""Writing results so that a crash, a full disk or Ctrl-C leaves the previous result (or none), never half of one.

``atomic_file`` and ``atomic_folder`` write beside the target and rename into place once complete;
``write_embeddings`` is ``st-npu embed``'s writer (``.npy``, ``.jsonl``, or JSON lines on standard output).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

STDOUT = "-"
EMBEDDING_SUFFIXES = (".npy", ".jsonl")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary binary file beside ``path``, renamed over it only once fully written."""
    handle = tempfile.NamedTemporaryFile(dir=Path(path).resolve().parent, prefix=f".{Path(path).name}.", delete=False)
    try:
        with handle:
            yield handle
        os.chmod(handle.name, 0o666 & ~_umask())  # temporary files are private; the result should not be
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into; on success its entries move into ``path``.

    A failure inside the block removes the temporary folder and leaves ``path`` as it was (absent, or with its
    old files). Entries that already exist in ``path`` are replaced one by one, as a save into an existing folder
    overwrites them; other files there stay.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}."))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if not target.exists():
            os.replace(staging, target)
            return
        for entry in staging.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_embeddings_output(output: str | None) -> str | None:
    """Why ``--output`` cannot be written (checked before any work), or None."""
    if output is None or output == STDOUT:
        return None
    path = Path(output)
    if path.suffix not in EMBEDDING_SUFFIXES:
        return f"--output {output}: use a .npy or .jsonl file, or - for JSON lines on standard output"
    if not path.resolve().parent.is_dir():
        return f"--output {output}: folder {path.resolve().parent} does not exist"
    return None


def write_embeddings(output: str, texts: Sequence[str], embeddings: Any) -> None:
    """``.npy`` (rows in input order), ``.jsonl`` or ``-`` (one ``{"text", "embedding"}`` object per line)."""
    if output == STDOUT:
        _write_json_lines(sys.stdout.buffer, texts, embeddings)
        sys.stdout.flush()
        return
    path = Path(output)
    with atomic_file(path) as handle:
        if path.suffix == ".npy":
            import numpy as np

            np.save(handle, embeddings)
        else:
            _write_json_lines(handle, texts, embeddings)


def _write_json_lines(handle: IO[bytes], texts: Sequence[str], embeddings: Any) -> None:
    for text, vector in zip(texts, embeddings, strict=True):
        line = json.dumps({"text": text, "embedding": [float(value) for value in vector]}, ensure_ascii=False)
        handle.write(line.encode("utf-8") + b"\n")
