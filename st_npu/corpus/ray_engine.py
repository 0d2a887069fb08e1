"""The Ray engine, for more than one machine: Ray Data schedules one model actor per NPU of the cluster.

Ray detects Ascend NPUs as the resource ``"NPU"`` and sets ``ASCEND_RT_VISIBLE_DEVICES`` for each actor, so an
actor's NPU is ``npu:0``. :func:`embed_dataset` is the building block for pipelines already on Ray: it takes and
returns a ``ray.data.Dataset`` (``map_batches`` with an actor pool of :class:`Embedder`). ``st-npu embed-corpus
--engine ray`` feeds it the same shards as the local engine, a window at a time (host memory stays bounded),
and writes the same Parquet shards and manifest from the driver. Ray restarts an actor that dies and retries
its batches, so a lost actor costs time, not rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from st_npu.corpus.encoder import ModelSettings, ShardEncoder
from st_npu.corpus.reader import Shard, pyarrow_modules
from st_npu.corpus.workers import Done
from st_npu.corpus.shards import write_shard

RAY_HINT = 'the Ray engine needs Ray Data: pip install "st-npu[ray]"'
ROW = "_st_npu_row"
# Shards handed to Ray per actor and window: enough to keep each actor busy, few enough to bound the driver's memory.
SHARDS_PER_ACTOR = 4


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(RAY_HINT) from None
    return ray


class Embedder:
    """The callable class Ray Data runs in each actor: one warmed-up st_npu model, ``"embedding"`` added."""

    def __init__(self, settings: ModelSettings, text_column: str = "text") -> None:
        self.encoder = ShardEncoder(settings, None)  # Ray made this actor's NPU npu:0; else st_npu's auto choice
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["embedding"] = self.encoder.encode([str(text) for text in batch[self.text_column]])
        return batch


def embed_dataset(dataset: Any, settings: ModelSettings, *, text_column: str = "text", actors: int = 1,
                  npus_per_actor: float = 1, cpus_per_actor: float = 1) -> Any:
    """``dataset`` with an ``"embedding"`` column, computed by ``actors`` model actors holding one NPU each.

    ``npus_per_actor=0`` runs actors without an NPU (CPU clusters). ``cpus_per_actor`` below 1 lets a host with
    fewer CPUs than NPUs use all of them. Batches are a multiple of the model's static batch bucket.
    """
    ray = import_ray()
    return dataset.map_batches(
        Embedder, fn_constructor_args=(settings,), fn_constructor_kwargs={"text_column": text_column},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=settings.batch_size * 4, batch_format="numpy",
        num_cpus=cpus_per_actor, resources={"NPU": npus_per_actor} if npus_per_actor else None)


def run_ray(address: str | None, actors: int | None, settings: ModelSettings, shards: Iterator[Shard], folder: Path,
            output_dtype: str, on_ready: Callable[[dict[str, Any]], None], on_done: Callable[[Done], None]) -> None:
    """Embed ``shards`` on a Ray cluster (``address``; None starts a local Ray) and write them as the local engine."""
    ray = import_ray()
    pyarrow = pyarrow_modules()[0]
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        npus = int(ray.cluster_resources().get("NPU", 0))
        actors = actors or max(npus, 1)
        description = ShardEncoder(settings, "cpu").describe()  # the manifest's model description, as locally
        on_ready(description)
        while window := list(islice(shards, actors * SHARDS_PER_ACTOR)):
            started = time.perf_counter()
            tables = [_shard_table(pyarrow, shard) for shard in window]
            dataset = embed_dataset(ray.data.from_arrow(tables), settings, actors=actors,
                                    npus_per_actor=1 if npus else 0, cpus_per_actor=_cpus_per_actor(ray, actors))
            rows = _collect(dataset)
            seconds = (time.perf_counter() - started) / len(window)
            for shard in window:
                vectors = np.stack([rows[row] for row in shard.rows]) if shard.rows else \
                    np.zeros((0, description["dimension"]), np.float32)
                record = write_shard(folder, shard.index, shard.start, shard.end, shard.ids, vectors, shard.keep,
                                     output_dtype)
                on_done(Done(record, f"ray ({actors} actors)", seconds, None))
    finally:
        if started_here:
            ray.shutdown()


def _shard_table(pyarrow: Any, shard: Shard) -> Any:
    return pyarrow.table({ROW: pyarrow.array(shard.rows, pyarrow.int64()), "text": pyarrow.array(shard.texts,
                                                                                                 pyarrow.string())})


def _collect(dataset: Any) -> dict[int, np.ndarray]:
    rows: dict[int, np.ndarray] = {}
    for batch in dataset.select_columns([ROW, "embedding"]).iter_batches(batch_format="numpy"):
        rows.update(zip(batch[ROW].tolist(), batch["embedding"]))
    return rows


def _cpus_per_actor(ray: Any, actors: int) -> float:
    # Each map worker reserves one CPU unless told otherwise: that would cap a host with fewer CPUs than NPUs.
    cpus = ray.cluster_resources().get("CPU", 1)
    return min(1.0, cpus / (actors + 1))
