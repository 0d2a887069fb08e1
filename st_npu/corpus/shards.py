"""One shard of output: a Parquet file ``part-NNNNN.parquet`` with ``id``, ``embedding`` (a fixed-size list of
float32 or float16) and the kept columns, written atomically; its sha256 is the checksum the manifest records.
Both engines (local and Ray) write through here, so their shards are the same files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from st_npu.corpus.reader import pyarrow_modules
from st_npu.loading.fingerprint import sha256_file
from st_npu.files.outputs import atomic_file

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


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


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(folder: Path, index: int, start: int, end: int, ids: list[Any], vectors: np.ndarray,
                keep: dict[str, list[Any]], output_dtype: str) -> ShardRecord:
    pyarrow, parquet, _ = pyarrow_modules()
    vectors = np.ascontiguousarray(vectors, dtype=OUTPUT_DTYPES[output_dtype])
    dimension = vectors.shape[1]
    embedding = pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(vectors.reshape(-1)), dimension)
    columns = {"id": pyarrow.array(ids, type=None if ids else pyarrow.int64()), "embedding": embedding, **{name: pyarrow.array(values)
                                                                    for name, values in keep.items()}}
    path = folder / shard_name(index)
    with atomic_file(path) as handle:
        parquet.write_table(pyarrow.table(columns), handle)
    return ShardRecord(index, path.name, start, end, len(ids), sha256_file(path))


def shard_holds(folder: Path, record: dict[str, Any]) -> bool:
    """Whether a shard the manifest lists is on disk with its recorded checksum."""
    path = folder / record["file"]
    return path.is_file() and sha256_file(path) == record["sha256"]
