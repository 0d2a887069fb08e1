"""A corpus job from end to end: check the input and the output folder, resume from the manifest, hand the shards
that are not done yet to an engine (local worker processes, or Ray), record each finished shard, and summarise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from st_npu.corpus import manifest as manifests
from st_npu.corpus.encoder import ModelSettings
from st_npu.corpus.reader import Fields, Shard, fingerprint, input_files, row_count, shards
from st_npu.corpus.shards import OUTPUT_DTYPES, shard_holds
from st_npu.corpus.workers import Done, run_here, run_processes
from st_npu.errors import UsageError
from st_npu.loading.fingerprint import model_identity
from st_npu.files.outputs import atomic_file

DEFAULT_SHARD_SIZE = 10_000
REJECTS = "rejects.jsonl"
ENGINES = ("local", "ray")
BAD_ROW_CHOICES = ("error", "skip")


def embed_corpus(model: str | os.PathLike[str], input: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 devices: Sequence[str] | None = None, dtype: str | None = None, spec: str | None = None,
                 prompt_name: str | None = None, max_seq_length: int | None = None, batch_size: int = 32,
                 text_field: str = "text", id_field: str | None = None, keep: Sequence[str] = (),
                 output_dtype: str = "float32", skip_empty: bool = False, on_bad_row: str = "error",
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, engine: str = "local",
                 ray_address: str | None = None, ray_actors: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Embed every row of ``input`` into Parquet shards under ``output``; returns the job's summary.

    ``model`` is a model folder or hub id (each worker loads its own copy). ``devices``: every local NPU by
    default (else st_npu's automatic choice), or a list such as ``["npu:0", "npu:3"]``. Rerunning the same call
    resumes; a call that differs in model, settings or input is refused unless ``overwrite``.
    """
    if output_dtype not in OUTPUT_DTYPES:
        raise UsageError(f"output dtype {output_dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    if on_bad_row not in BAD_ROW_CHOICES:
        raise UsageError(f"on_bad_row {on_bad_row!r}: choose one of {', '.join(BAD_ROW_CHOICES)}")
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    from st_npu.loading.folder import resolve_model_path

    files = input_files(input)
    fields = Fields(text_field, id_field, tuple(keep))
    settings = ModelSettings(str(model), dtype, spec, prompt_name, max_seq_length, batch_size)
    job = {
        "format": manifests.FORMAT,
        "settings": {**settings.to_json(), "output_dtype": output_dtype, "text_field": text_field,
                     "id_field": id_field, "keep": list(keep), "skip_empty": skip_empty, "on_bad_row": on_bad_row,
                     "shard_size": shard_size},
        "model_identity": model_identity(resolve_model_path(str(model)), {"name": spec} if spec else None),
        "input": fingerprint(files),
    }
    folder = _prepare_output(Path(output), job, overwrite)
    state = manifests.load(folder) or {**job, "model": None, "shards": {}, "complete": False}
    state.update(complete=False, input_rows=None, rejects=0)
    return _Run(folder, state, files, fields, settings, skip_empty, on_bad_row == "skip", progress).execute(
        engine, _devices(devices) if engine == "local" else None, ray_address, ray_actors)


def _prepare_output(folder: Path, job: dict[str, Any], overwrite: bool) -> Path:
    saved = manifests.load(folder) if folder.is_dir() else None
    if saved is not None and overwrite:
        for path in [*folder.glob("part-*.parquet"), folder / REJECTS, folder / manifests.NAME]:
            path.unlink(missing_ok=True)
    elif saved is not None:
        differences = manifests.differences(saved, job)
        if differences:
            raise UsageError(f"{folder} holds the output of another job ({'; '.join(differences)}); use another "
                             f"--output folder, or --overwrite to start over")
    elif folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty and has no {manifests.NAME}: choose an empty or new --output folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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

    def __init__(self, folder: Path, state: dict[str, Any], files: list[Path], fields: Fields,
                 settings: ModelSettings, skip_empty: bool, skip_bad_rows: bool, progress: bool) -> None:
        self.folder, self.state, self.files, self.fields, self.settings = folder, state, files, fields, settings
        self.skip_empty, self.skip_bad_rows, self.progress = skip_empty, skip_bad_rows, progress
        self.counts = {"rows": 0, "embedded": 0, "empty_skipped": 0, "rejects": 0, "shards_done": 0,
                       "shards_skipped": 0}
        self.per_device: dict[str, dict[str, Any]] = {}

    def execute(self, engine: str, devices: list[str | None] | None, ray_address: str | None,
                ray_actors: int | None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        output_dtype = self.state["settings"]["output_dtype"]
        with ExitStack() as stack:
            rejects = stack.enter_context(atomic_file(self.folder / REJECTS)) if self.skip_bad_rows else None
            self.bar = stack.enter_context(tqdm(total=row_count(self.files), unit="row", disable=not self.progress,
                                                desc="embed-corpus", smoothing=0.1))
            todo = self._to_do(rejects)
            if engine == "ray":
                from st_npu.corpus.ray_engine import run_ray

                run_ray(ray_address, ray_actors, self.settings, todo, self.folder, output_dtype, self._ready,
                        self._done)
            elif len(devices) == 1:
                run_here(devices[0], self.settings, todo, self.folder, output_dtype, self._ready, self._done)
            else:
                run_processes(devices, self.settings, todo, self.folder, output_dtype, self._ready, self._done)
        self.state.update(complete=True, input_rows=self.counts["rows"], rejects=self.counts["rejects"])
        manifests.save(self.folder, self.state)
        return self._summary(time.perf_counter() - started)

    def _to_do(self, rejects: Any) -> Iterator[Shard]:
        """The shards that need embedding; finished ones whose checksums hold are counted and passed over."""
        for shard in shards(self.files, self.fields, self.state["settings"]["shard_size"], self.skip_empty,
                            self.skip_bad_rows):
            self.counts["rows"] += shard.end - shard.start
            self.counts["empty_skipped"] += shard.empty_skipped
            self.counts["rejects"] += len(shard.rejects)
            for reject in shard.rejects:
                line = {"row": reject.row, "where": reject.where, "reason": reject.reason}
                rejects.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
            saved = self.state["shards"].get(f"{shard.index:05d}")
            if saved is not None and shard_holds(self.folder, saved):
                self.counts["shards_skipped"] += 1
                self.bar.update(shard.end - shard.start)
                continue
            yield shard

    def _ready(self, description: dict[str, Any]) -> None:
        saved = self.state.get("model")
        if saved is not None and saved != description:
            differing = sorted(key for key in description if saved.get(key) != description.get(key))
            raise UsageError(f"{self.folder}: the model now gives other {', '.join(differing)} than the manifest "
                             f"records; use --overwrite to start over")
        self.state["model"] = description

    def _done(self, done: Done) -> None:
        record = done.record
        self.state["shards"][f"{record.index:05d}"] = record.to_json()
        manifests.save(self.folder, self.state)
        self.counts["shards_done"] += 1
        self.counts["embedded"] += record.count
        device = self.per_device.setdefault(done.device, {"rows": 0, "shards": 0, "seconds": 0.0, "ops": None})
        device["rows"] += record.count
        device["shards"] += 1
        device["seconds"] += done.seconds
        device["ops"] = done.ops
        self.bar.update(record.end - record.start)

    def _summary(self, seconds: float) -> dict[str, Any]:
        for device in self.per_device.values():
            device["rows_per_s"] = round(device["rows"] / device["seconds"], 1) if device["seconds"] else None
        return {**self.counts, "shards": len(self.state["shards"]), "seconds": round(seconds, 2),
                "rows_per_s": round(self.counts["embedded"] / seconds, 1) if seconds else None,
                "devices": self.per_device, "output": str(self.folder)}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"rows:      {summary['rows']} ({summary['embedded']} embedded now, {summary['empty_skipped']} empty "
             f"skipped, {summary['rejects']} rejected)",
             f"shards:    {summary['shards']} ({summary['shards_done']} done now, {summary['shards_skipped']} "
             f"already done)",
             f"time:      {summary['seconds']} s ({summary['rows_per_s']} rows/s)"]
    for device, figures in summary["devices"].items():
        ops = f", {figures['ops']} operators (emulated)" if figures["ops"] is not None else ""
        lines.append(f"  {device:<10} {figures['rows']} rows in {figures['shards']} shards, "
                     f"{figures['rows_per_s']} rows/s{ops}")
    lines.append(f"output:    {summary['output']}")
    return "\n".join(lines)


def run_embed_corpus(args: argparse.Namespace) -> int:
    """``st-npu embed-corpus``: 0 when every row is embedded (or rejected with --on-bad-row skip)."""
    if args.device and args.devices:
        raise UsageError("give --device or --devices, not both")
    devices = args.devices.split(",") if args.devices else [args.device] if args.device else None
    summary = embed_corpus(args.model, args.input, args.output, devices=devices, dtype=args.dtype, spec=args.spec,
                           prompt_name=args.prompt_name, max_seq_length=args.max_seq_length,
                           batch_size=args.batch_size, text_field=args.text_field, id_field=args.id_field,
                           keep=args.keep.split(",") if args.keep else (), output_dtype=args.output_dtype,
                           skip_empty=args.skip_empty, on_bad_row=args.on_bad_row, shard_size=args.shard_size,
                           overwrite=args.overwrite, engine=args.engine, ray_address=args.ray_address,
                           ray_actors=args.ray_actors, progress=sys.stderr.isatty() or args.progress)
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0
