"""The Ray engine, for more than one machine: one streaming Ray Data job with one pool of model actors.

The driver never reads a text or a vector. It counts each input file's rows in Ray tasks (Parquet metadata, the
lines of a text file, a CSV parse), cuts the same shards as the local engine from those counts, and hands Ray
Data a dataset of shard plans. One actor pool, alive for the whole job (``ActorPoolStrategy(min_size,
max_size)``, ``resources={"NPU": 1}`` each), takes them: each actor loads and warms its model once, then per
shard reads its rows from the input, embeds them and writes the Parquet shard straight to the output folder
(which every node must reach: an object store such as S3/OBS/MinIO, HDFS, or a shared file system; each
actor gets the job's pyarrow filesystems). The driver gets back each shard's record (row range, count,
checksum, and its ids when ids must be unique: the driver checks them as the local engine does, never reading a
text) and writes the manifest, as the local engine does. Actors report rows to a small progress actor as
batches finish, so the driver's bar moves by batch. Ray detects Ascend NPUs as the resource ``"NPU"``
and sets ``ASCEND_RT_VISIBLE_DEVICES`` for each actor, so an actor's NPU is ``npu:0``. Ray restarts an actor that
dies and retries its shard, so a lost actor or node costs time, not rows; a shard written twice is the same file.

:func:`embed_dataset` is the building block for pipelines already on Ray: it takes and returns a
``ray.data.Dataset`` (``map_batches`` with an actor pool of :class:`Embedder`).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
from typing import Any

import numpy as np

from st_npu.corpus import encoder as encoders
from st_npu.corpus.encoder import ModelSettings, ShardEncoder
from st_npu.corpus.reader import (Fields, MissingExtra, ShardPlan, count_file, duplicate_id, place, plan_shards,
                                  read_shard)
from st_npu.corpus.shards import CALIBRATION_ROWS, RANGED, ShardFormat, ShardRecord, ranges_of, shard_holds
from st_npu.corpus.storage import Location
from st_npu.files.inputs import InputError

RAY_HINT = 'the Ray engine needs Ray Data: pip install "st-npu[ray]"'
PROGRESS_POLL_S = 0.2


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtra(RAY_HINT) from None
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


class ShardWriter:
    """The callable class of the job's actor pool: reads, embeds and writes whole shards, returns their records."""

    def __init__(self, settings: ModelSettings, fields: Fields, skip_empty: bool, skip_bad_rows: bool,
                 folder: Location, form: ShardFormat, progress: Any = None, report_ids: bool = False) -> None:
        import ray

        self.encoder = ShardEncoder(settings, None)
        self.fields, self.skip_empty, self.skip_bad_rows = fields, skip_empty, skip_bad_rows
        self.folder, self.form, self.progress, self.report_ids = folder, form, progress, report_ids
        context = ray.get_runtime_context()
        self.where = {"actor": context.get_actor_id(), "node": context.get_node_id(), "host": socket.gethostname(),
                      "pid": os.getpid()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for plan, saved in zip(batch["plan"], batch["saved"]):
            plan: ShardPlan = pickle.loads(plan)
            try:
                shard = read_shard(plan, self.fields, self.skip_empty, self.skip_bad_rows)
            except InputError as exc:  # the driver raises it as the local engine would, without Ray's traceback
                results.append(json.dumps({"index": plan.index, "input_error": str(exc)}))
                continue
            result = {"index": plan.index, "rows": plan.end - plan.start, "empty_skipped": shard.empty_skipped,
                      "rejects": [(reject.row, reject.where, reject.reason) for reject in shard.rejects],
                      "model": self.encoder.describe(), "loads": encoders.loads, **self.where}
            if self.report_ids:
                result["ids"] = list(zip(shard.rows, shard.ids))
            saved = json.loads(saved)
            if saved is not None and shard_holds(self.folder, saved):
                result["skipped"] = True
            else:
                on_rows = None
                if self.progress is not None:
                    self.progress.start.remote(plan.index)
                    on_rows = lambda rows, index=plan.index: self.progress.add.remote(index, rows)  # noqa: E731
                from st_npu.corpus.workers import embed_shard

                done = embed_shard(self.encoder, shard, self.folder, self.form, on_rows)
                result.update(record=done.record.to_json(), device=done.device, seconds=done.seconds,
                              threads=done.threads)
            results.append(json.dumps(result))
        return {"result": np.array(results, dtype=object)}


def run_ray(address: str | None, actors: int | None, run: Any) -> None:
    """Embed the shards of ``run`` (a job's run, :mod:`st_npu.corpus.job`) on a Ray cluster (``address``; None
    starts a local Ray of this machine)."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:  # "local": a Ray already running on this machine is not joined unless asked for
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    try:
        npus = int(ray.cluster_resources().get("NPU", 0))
        actors = actors or max(npus, 1)
        options = {"num_cpus": _cpus_per_actor(ray, actors), "resources": {"NPU": 1} if npus else None}
        shard_size = run.state["settings"]["shard_size"]
        count = ray.remote(count_file).options(num_cpus=options["num_cpus"])
        counts = ray.get([count.remote(path, run.fields) for path in run.files])
        run.bar.total = sum(file.rows for file in counts)
        if run.output_dtype in RANGED and run.state["ranges"] is None:
            plan = plan_shards(counts, CALIBRATION_ROWS)[0]
            calibrate = ray.remote(_calibrate).options(**options)
            description, ranges = ray.get(calibrate.remote(run.settings, run.fields, plan))
            run.ready(description)
            run.set_ranges(ranges)
        saved = run.state["shards"]
        plans = [{"plan": pickle.dumps(plan), "saved": json.dumps(saved.get(f"{plan.index:05d}"))}
                 for plan in plan_shards(counts, shard_size)]
        # Beside the driver, which outlives any other node of the job; restarted should its node go all the same.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        near = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        progress = ray.remote(Progress).options(num_cpus=0, max_restarts=-1, scheduling_strategy=near).remote()
        report_ids = run.unique_ids and run.fields.id is not None
        dataset = ray.data.from_items(plans, override_num_blocks=len(plans)).map_batches(
            ShardWriter, fn_constructor_args=(run.settings, run.fields, run.skip_empty, run.skip_bad_rows,
                                              run.folder, run.shard_format, progress, report_ids),
            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors), batch_size=1, batch_format="numpy",
            **options)
        first_rows: dict[Any, int] = {}
        with _ProgressPoller(ray, progress, run) as poller:
            for row in dataset.iter_rows():
                result = json.loads(row["result"])
                if report_ids:
                    _check_ids(counts, first_rows, result)
                with poller.lock:
                    _record(run, result)
    finally:
        if started_here:
            ray.shutdown()


class Progress:
    """The Ray actor that collects the rows actors embed, batch by batch, for the driver to take as they come."""

    def __init__(self) -> None:
        self.reports: list[int] = []
        self.shard_rows: dict[int, int] = {}

    def start(self, index: int) -> None:
        # A shard begun again (its first actor died) takes back the rows it had reported.
        again = self.shard_rows.pop(index, 0)
        if again:
            self.reports.append(-again)

    def add(self, index: int, rows: int) -> None:
        self.shard_rows[index] = self.shard_rows.get(index, 0) + rows
        self.reports.append(rows)

    def take(self) -> list[int]:
        reports, self.reports = self.reports, []
        return reports


class _ProgressPoller:
    """A driver thread that moves the bar by each report of the progress actor, until the job ends."""

    def __init__(self, ray: Any, progress: Any, run: Any) -> None:
        self.ray, self.progress, self.run = ray, progress, run
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._poll, name="st-npu-ray-progress", daemon=True)

    def __enter__(self) -> _ProgressPoller:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self._move()  # the last batches' reports

    def _poll(self) -> None:
        while not self.stop.wait(PROGRESS_POLL_S):
            self._move()

    def _move(self) -> None:
        try:
            reports = self.ray.get(self.progress.take.remote())
        except self.ray.exceptions.RayError:  # the progress actor is being restarted: the bar is only a display
            return
        for rows in reports:
            with self.lock:
                self.run.bar.update(rows)


def _check_ids(counts: list[Any], first_rows: dict[Any, int], result: dict[str, Any]) -> None:
    """The local engine's duplicate-id check on the ids a shard's actor reported (shards come in any order)."""
    for row, identity in result.get("ids", ()):
        first = first_rows.setdefault(identity, row)
        if first != row:
            first, row = sorted((first, row))
            raise duplicate_id(place(counts, row), identity, first, row)


def _calibrate(settings: ModelSettings, fields: Fields, plan: ShardPlan) -> tuple[dict[str, Any], list]:
    encoder = ShardEncoder(settings, None)
    texts = read_shard(plan, fields, skip_empty=True, skip_bad_rows=True).texts
    return encoder.describe(), ranges_of(encoder.encode(texts))


def _record(run: Any, result: dict[str, Any]) -> None:
    if "input_error" in result:
        raise InputError(result["input_error"])
    if run.state.get("model") != result["model"]:
        run.ready(result["model"])
    run.read(result["rows"], result["empty_skipped"], result["rejects"])
    actor = run.actors.setdefault(result["actor"], {"node": result["node"], "host": result["host"],
                                                    "pid": result["pid"], "shards": 0})
    actor["model_loads"] = result["loads"]
    if result.get("skipped"):
        run.skipped(result["rows"])
        return
    actor["shards"] += 1
    from st_npu.corpus.workers import Done

    done = Done(ShardRecord(**result["record"]), f"ray {result['device']} of {result['host']}:{result['pid']}",
                result["seconds"], None, result["threads"])
    run.done(done)


def _cpus_per_actor(ray: Any, actors: int) -> float:
    # Each map worker reserves one CPU unless told otherwise: that would cap a host with fewer CPUs than NPUs.
    cpus = ray.cluster_resources().get("CPU", 1)
    return min(1.0, cpus / (actors + 1))
