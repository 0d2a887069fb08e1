"""One shard of output: a Parquet file ``part-NNNNN.parquet`` with ``id``, ``embedding`` (a fixed-size list of the
output dtype) and the kept columns, written atomically (on a store too: see :func:`~st_npu.corpus.storage.atomic_write`);
its sha256 is the checksum the manifest records. Both engines (local and Ray) write through here, so their shards
are the same files.

``int8`` and ``uint8`` map each dimension's range to 256 steps. The ranges are the job's, fixed before the first
shard and kept in the manifest: ranges taken from each shard's own vectors (sentence-transformers' default) would
quantise every shard differently. ``binary`` and ``ubinary`` pack the signs, 8 dimensions a byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from st_npu.corpus import storage
from st_npu.corpus.reader import READ_BUFFER, pyarrow_modules
from st_npu.corpus.storage import Location

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
RANGED = ("int8", "uint8")
# The first rows of the input whose vectors fix the int8/uint8 ranges when none are given.
CALIBRATION_ROWS = 1000


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest keeps of a finished shard."""

    index: int
    file: str
    start: int
    end: int
    count: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShardFormat:
    """How vectors are stored: the output dtype, and for int8/uint8 the job's ranges (minimum row, maximum row)."""

    dtype: str = "float32"
    ranges: list[list[float]] | None = None


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def ranges_of(vectors: np.ndarray) -> list[list[float]]:
    """Each dimension's minimum and maximum over a sample of the job's vectors, as the manifest keeps them."""
    return np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32).tolist()


def convert(vectors: np.ndarray, output_dtype: str, ranges: list[list[float]] | None = None) -> np.ndarray:
    """Float32 vectors as the output dtype stores them."""
    if output_dtype in ("float32", "float16"):
        return np.ascontiguousarray(vectors, dtype=output_dtype)
    from sentence_transformers import quantize_embeddings

    if not len(vectors):
        width = vectors.shape[1] if output_dtype in RANGED else -(-vectors.shape[1] // 8)
        return np.zeros((0, width), np.uint8 if output_dtype.startswith("u") else np.int8)
    fixed = np.asarray(ranges, dtype=np.float32) if output_dtype in RANGED else None
    return np.ascontiguousarray(quantize_embeddings(vectors, output_dtype, ranges=fixed))


def write_shard(folder: Location, index: int, start: int, end: int, ids: list[Any], vectors: np.ndarray,
                keep: dict[str, list[Any]], form: ShardFormat) -> ShardRecord:
    pyarrow, parquet, _ = pyarrow_modules()
    vectors = convert(vectors, form.dtype, form.ranges)
    embedding = pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(vectors.reshape(-1)), vectors.shape[1])
    columns = {"id": pyarrow.array(ids, type=None if ids else pyarrow.int64()), "embedding": embedding,
               **{name: pyarrow.array(values) for name, values in keep.items()}}
    # Built in memory, then written in one piece: the checksum is of the very bytes sent.
    sink = pyarrow.BufferOutputStream()
    parquet.write_table(pyarrow.table(columns), sink)
    data = sink.getvalue()
    storage.write_bytes(folder.child(shard_name(index)), data)
    return ShardRecord(index, shard_name(index), start, end, len(ids), hashlib.sha256(data).hexdigest())


def shard_holds(folder: Location, record: dict[str, Any]) -> bool:
    """Whether a shard the manifest lists is there with its recorded checksum."""
    location = folder.child(record["file"])
    if not storage.is_file(location):
        return False
    digest = hashlib.sha256()
    with storage.open_input(location) as handle:
        while chunk := handle.read(READ_BUFFER):
            digest.update(chunk)
    return digest.hexdigest() == record["sha256"]
