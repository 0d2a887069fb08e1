"""A corpus job from end to end: check the input and the output folder (on disk or on a store, reachable and
writable before any model loads), resume from the manifest (a complete job is answered from it, without loading
the model), hand the shards that are not done yet to an engine (local worker processes, or Ray), record each
finished shard, and summarise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from st_npu.corpus import manifest as manifests
from st_npu.corpus import storage
from st_npu.corpus.encoder import ModelSettings, ShardEncoder
from st_npu.corpus.reader import Fields, Shard, fingerprint, input_files, pyarrow_modules, row_count, shards
from st_npu.corpus.shards import CALIBRATION_ROWS, OUTPUT_DTYPES, RANGED, ShardFormat, ranges_of, shard_holds
from st_npu.corpus.storage import Location
from st_npu.errors import UsageError
from st_npu.loading.fingerprint import model_identity

if TYPE_CHECKING:
    from st_npu.corpus.workers import Done

DEFAULT_SHARD_SIZE = 10_000
REJECTS = "_rejects.jsonl"
ENGINES = ("local", "ray")
BAD_ROW_CHOICES = ("error", "skip")
DUPLICATE_ID_CHOICES = ("error", "keep")


def embed_corpus(model: str | os.PathLike[str], input: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 devices: Sequence[str] | None = None, dtype: str | None = None, spec: str | None = None,
                 prompt_name: str | None = None, max_seq_length: int | None = None, batch_size: int = 32,
                 max_batch_tokens: int | None = None,
                 text_field: str = "text", id_field: str | None = None, keep: Sequence[str] = (),
                 output_dtype: str = "float32", truncate_dim: int | None = None, int8_ranges: Any = None,
                 skip_empty: bool = False, on_bad_row: str = "error", on_duplicate_id: str = "error",
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, engine: str = "local",
                 ray_address: str | None = None, ray_actors: int | None = None,
                 storage_options: Mapping[str, str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Embed every row of ``input`` into Parquet shards under ``output``; returns the job's summary.

    ``model`` is a model folder or hub id (each worker loads its own copy). ``devices``: every local NPU by
    default (else st_npu's automatic choice), or a list such as ``["npu:0", "npu:3"]``. ``input`` and ``output`` are
    paths or URIs (``s3://bucket/prefix``, ``gs://``, ``hdfs://``, ``file://``); ``storage_options`` (such as
    ``{"endpoint_override": "obs.example.com"}``) go to the store of each URI. ``output_dtype`` int8 or
    uint8 quantises with ``int8_ranges`` (a (2, dimension) array of minima and maxima) or, without them, the ranges
    of the input's first rows; either way the manifest keeps them. Rerunning the same call resumes; a call that
    differs in model, settings or input is refused unless ``overwrite``.
    """
    pyarrow_modules()  # before any work: without pyarrow no shard could be written
    for name, value, choices in (("output dtype", output_dtype, OUTPUT_DTYPES), ("on_bad_row", on_bad_row,
                                 BAD_ROW_CHOICES), ("on_duplicate_id", on_duplicate_id, DUPLICATE_ID_CHOICES),
                                 ("engine", engine, ENGINES)):
        if value not in choices:
            raise UsageError(f"{name} {value!r}: choose one of {', '.join(choices)}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("truncate_dim", truncate_dim or 1),
                        ("max_batch_tokens", max_batch_tokens or 1)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if int8_ranges is not None and output_dtype not in RANGED:
        raise UsageError(f"int8_ranges are for output dtype int8 or uint8, not {output_dtype}")
    from st_npu.loading.folder import resolve_model_path

    source, folder = storage.locate(input, storage_options), storage.locate(output, storage_options)
    files = input_files(source)
    storage.prepare_folder(folder)
    fields = Fields(text_field, id_field, tuple(keep))
    settings = ModelSettings(str(model), dtype, spec, prompt_name, max_seq_length, batch_size, truncate_dim,
                             max_batch_tokens)
    ranges = _given_ranges(int8_ranges)
    job = {
        "format": manifests.FORMAT,
        "settings": {**settings.to_json(), "output_dtype": output_dtype, "int8_ranges": ranges,
                     "text_field": text_field, "id_field": id_field, "keep": list(keep), "skip_empty": skip_empty,
                     "on_bad_row": on_bad_row, "on_duplicate_id": on_duplicate_id, "shard_size": shard_size},
        "model_identity": model_identity(resolve_model_path(str(model)), {"name": spec} if spec else None),
        "input": fingerprint(files),
    }
    saved = _prepare_output(folder, job, overwrite)
    if saved is not None and saved.get("complete") and all(shard_holds(folder, shard)
                                                           for shard in saved["shards"].values()):
        storage.remove_temporaries(folder)
        return _finished_summary(saved, folder)
    state = saved or {**job, "model": None, "ranges": ranges, "shards": {}, "complete": False}
    state.update(settings=job["settings"], complete=False, input_rows=None, rejects=0)
    run = _Run(folder, state, files, fields, settings, skip_empty, on_bad_row == "skip", on_duplicate_id == "error",
               progress)
    return run.execute(engine, _devices(devices) if engine == "local" else None, ray_address, ray_actors)


def _given_ranges(ranges: Any) -> list[list[float]] | None:
    if ranges is None:
        return None
    array = np.asarray(ranges, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != 2 or not np.isfinite(array).all() or (array[1] < array[0]).any():
        raise UsageError(f"int8_ranges must be a (2, dimension) array of finite minima then maxima, got shape "
                         f"{array.shape}")
    return array.tolist()


def _prepare_output(folder: Location, job: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the job to resume, or None to start; a folder holding anything else is refused."""
    saved = manifests.load(folder)
    names = [name for name in storage.files_under(folder) if not name.startswith(storage.TEMPORARY)]
    if saved is not None and overwrite:
        for name in names:
            if name in (REJECTS, manifests.NAME) or (name.startswith("part-") and name.endswith(".parquet")):
                storage.delete(folder.child(name))
        return None
    if saved is not None:
        differences = manifests.differences(saved, job)
        if differences:
            raise UsageError(f"{folder} holds the output of another job ({'; '.join(differences)}); use another "
                             f"--output folder, or --overwrite to start over")
    elif names:
        raise UsageError(f"{folder} is not empty and has no {manifests.NAME}: choose an empty or new --output folder")
    return saved


def _finished_summary(saved: dict[str, Any], folder: Location) -> dict[str, Any]:
    """The summary of a job the manifest records as complete, every shard there with its checksum."""
    records = saved["shards"].values()
    left_out = sum(record["end"] - record["start"] - record["count"] for record in records)
    return {"rows": saved["input_rows"], "embedded": 0, "empty_skipped": left_out - saved["rejects"],
            "rejects": saved["rejects"], "shards_done": 0, "shards_skipped": len(records), "shards": len(records),
            "seconds": 0.0, "rows_per_s": None, "devices": {}, "output": str(folder)}


def _devices(devices: Sequence[str] | None) -> list[str | None]:
    """Every local NPU by default, else one process on st_npu's automatic choice; named devices checked here."""
    from st_npu.runtime.devices import npu_count, resolve_device

    if devices:
        resolved = [str(resolve_device(device)) for device in devices]
        repeated = sorted({device for device in resolved if resolved.count(device) > 1})
        if repeated:
            raise UsageError(f"--devices names {', '.join(repeated)} twice: one worker per device")
        return resolved
    count = npu_count()
    return [f"npu:{index}" for index in range(count)] if count else [None]


class _Run:
    """One execution: feeds the engine the shards still to do, records what it finishes, counts for the summary."""

    def __init__(self, folder: Location, state: dict[str, Any], files: list[Location], fields: Fields,
                 settings: ModelSettings, skip_empty: bool, skip_bad_rows: bool, unique_ids: bool,
                 progress: bool) -> None:
        self.folder, self.state, self.files, self.fields, self.settings = folder, state, files, fields, settings
        self.skip_empty, self.skip_bad_rows, self.unique_ids, self.progress = (skip_empty, skip_bad_rows, unique_ids,
                                                                               progress)
        self.counts = {"rows": 0, "embedded": 0, "empty_skipped": 0, "rejects": 0, "shards_done": 0,
                       "shards_skipped": 0}
        self.per_device: dict[str, dict[str, Any]] = {}
        self.actors: dict[str, dict[str, Any]] = {}  # Ray actors: host, pid, shards, model loads
        self.rejects: Any = None

    @property
    def output_dtype(self) -> str:
        return self.state["settings"]["output_dtype"]

    def execute(self, engine: str, devices: list[str | None] | None, ray_address: str | None,
                ray_actors: int | None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        with ExitStack() as stack:
            self.rejects = (stack.enter_context(storage.atomic_write(self.folder.child(REJECTS)))
                            if self.skip_bad_rows else None)
            # The rate counts only rows embedded now: a finished shard found on resume lowers the total instead.
            self.bar = stack.enter_context(tqdm(total=None if engine == "ray" else row_count(self.files), unit="row",
                                                disable=not self.progress, desc="embed-corpus", smoothing=0.1))
            if engine == "ray":
                from st_npu.corpus.ray_engine import run_ray

                run_ray(ray_address, ray_actors, self)
            else:
                self._run_local(devices)
        self.state.update(complete=True, input_rows=self.counts["rows"], rejects=self.counts["rejects"])
        manifests.save(self.folder, self.state)
        storage.remove_temporaries(self.folder)  # what a killed run left: the objects are those of one whole run
        return self._summary(time.perf_counter() - started)

    def _run_local(self, devices: list[str | None]) -> None:
        # Imported here: the workers import torch, which a job answered from its manifest never needs.
        from st_npu.corpus.workers import run_here, run_processes

        encoder = ShardEncoder(self.settings, devices[0]) if len(devices) == 1 else None
        if self.output_dtype in RANGED and self.state["ranges"] is None:
            sample = next(shards(self.files, self.fields, CALIBRATION_ROWS, True, True, False)).texts
            self.set_ranges(ranges_of((encoder or ShardEncoder(self.settings, devices[0])).encode(sample)))
        if encoder is not None:
            run_here(encoder, self._to_do(), self.folder, self.shard_format, self.ready, self.done, self.bar.update)
        else:
            run_processes(devices, self.settings, self._to_do(), self.folder, self.shard_format, self.ready,
                          self.done, self.bar.update)

    def set_ranges(self, ranges: list[list[float]]) -> None:
        """Fix the int8/uint8 ranges for the whole job (from the vectors of a sample), and keep them."""
        self.state["ranges"] = ranges
        manifests.save(self.folder, self.state)

    @property
    def shard_format(self) -> ShardFormat:
        return ShardFormat(self.output_dtype, self.state["ranges"])

    def _to_do(self) -> Iterator[Shard]:
        """The shards that need embedding; finished ones whose checksums hold are counted and passed over."""
        for shard in shards(self.files, self.fields, self.state["settings"]["shard_size"], self.skip_empty,
                            self.skip_bad_rows, self.unique_ids):
            self.read(shard.end - shard.start, shard.empty_skipped,
                      [(reject.row, reject.where, reject.reason) for reject in shard.rejects])
            saved = self.state["shards"].get(f"{shard.index:05d}")
            if saved is not None and shard_holds(self.folder, saved):
                self.skipped(shard.end - shard.start)
                continue
            yield shard

    def read(self, rows: int, empty_skipped: int, rejects: list[tuple[int, str, str]]) -> None:
        """Count a shard's rows, blanks left out and rejects (written to the rejects file)."""
        self.counts["rows"] += rows
        self.counts["empty_skipped"] += empty_skipped
        self.counts["rejects"] += len(rejects)
        for row, where, reason in rejects:
            line = {"row": row, "where": where, "reason": reason}
            self.rejects.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")

    def skipped(self, rows: int) -> None:
        self.counts["shards_skipped"] += 1
        if self.bar.total is not None:
            self.bar.total -= rows
        self.bar.set_postfix_str(f"{self.counts['shards_skipped']} shards done before", refresh=True)

    def ready(self, description: dict[str, Any]) -> None:
        saved = self.state.get("model")
        if saved is not None and saved != description:
            differing = sorted(key for key in description if saved.get(key) != description.get(key))
            raise UsageError(f"{self.folder}: the model now gives other {', '.join(differing)} than the manifest "
                             f"records; use --overwrite to start over")
        ranges = self.state["ranges"]
        if ranges is not None and len(ranges[0]) != description["dimension"]:
            raise UsageError(f"int8_ranges have {len(ranges[0])} dimensions; the model's vectors have "
                             f"{description['dimension']}")
        self.state["model"] = description

    def done(self, done: Done) -> None:
        record = done.record
        self.state["shards"][f"{record.index:05d}"] = record.to_json()
        manifests.save(self.folder, self.state)
        self.counts["shards_done"] += 1
        self.counts["embedded"] += record.count
        device = self.per_device.setdefault(done.device, {"rows": 0, "shards": 0, "seconds": 0.0, "ops": None,
                                                          "threads": done.threads})
        device["rows"] += record.count
        device["shards"] += 1
        device["seconds"] += done.seconds
        device["ops"] = done.ops
        # Embedded rows moved the bar as their batches finished; the shard's blanks and rejects move it now.
        self.bar.update(record.end - record.start - record.count)

    def _summary(self, seconds: float) -> dict[str, Any]:
        for device in self.per_device.values():
            device["rows_per_s"] = round(device["rows"] / device["seconds"], 1) if device["seconds"] else None
        return {**self.counts, "shards": len(self.state["shards"]), "seconds": round(seconds, 2),
                "rows_per_s": round(self.counts["embedded"] / seconds, 1) if seconds else None,
                "devices": self.per_device, **({"actors": self.actors} if self.actors else {}),
                "output": str(self.folder)}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"rows:      {summary['rows']} ({summary['embedded']} embedded now, {summary['empty_skipped']} empty "
             f"skipped, {summary['rejects']} rejected)",
             f"shards:    {summary['shards']} ({summary['shards_done']} done now, {summary['shards_skipped']} "
             f"already done)",
             f"time:      {summary['seconds']} s ({summary['rows_per_s']} rows/s)"]
    for device, figures in summary["devices"].items():
        ops = f", {figures['ops']} operators (emulated)" if figures["ops"] is not None else ""
        threads = f", {figures['threads']} torch threads" if figures.get("threads") else ""
        lines.append(f"  {device:<10} {figures['rows']} rows in {figures['shards']} shards, "
                     f"{figures['rows_per_s']} rows/s{ops}{threads}")
    if summary.get("actors"):
        loads = sorted({actor["model_loads"] for actor in summary["actors"].values()})
        lines.append(f"  {len(summary['actors'])} Ray actors; model loads per actor: {', '.join(map(str, loads))}")
    lines.append(f"output:    {summary['output']}")
    return "\n".join(lines)


def _storage_options(given: Sequence[str] | None) -> dict[str, str]:
    """``--storage-option KEY=VALUE``, as often as needed."""
    options = {}
    for option in given or ():
        key, equals, value = option.partition("=")
        if not equals or not key:
            raise UsageError(f"--storage-option {option!r}: expected KEY=VALUE, e.g. endpoint_override=obs.example.com")
        options[key] = value
    return options


def run_embed_corpus(args: argparse.Namespace) -> int:
    """``st-npu embed-corpus``: 0 when every row is embedded (or rejected with --on-bad-row skip)."""
    if args.device and args.devices:
        raise UsageError("give --device or --devices, not both")
    devices = args.devices.split(",") if args.devices else [args.device] if args.device else None
    summary = embed_corpus(args.model, args.input, args.output, devices=devices, dtype=args.dtype, spec=args.spec,
                           prompt_name=args.prompt_name, max_seq_length=args.max_seq_length,
                           batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                           text_field=args.text_field, id_field=args.id_field,
                           keep=args.keep.split(",") if args.keep else (), output_dtype=args.output_dtype,
                           truncate_dim=args.truncate_dim,
                           int8_ranges=np.load(args.int8_ranges) if args.int8_ranges else None,
                           skip_empty=args.skip_empty, on_bad_row=args.on_bad_row,
                           on_duplicate_id=args.on_duplicate_id, shard_size=args.shard_size,
                           overwrite=args.overwrite, engine=args.engine, ray_address=args.ray_address,
                           ray_actors=args.ray_actors, storage_options=_storage_options(args.storage_option),
                           progress=sys.stderr.isatty() or args.progress)
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0
