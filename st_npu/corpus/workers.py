"""The local engine: one worker process per device, each holding a warmed-up model, fed shard by shard.

A worker gets its next shard only when it has finished the last one, so a slow device takes fewer shards, and
at most one shard per worker is in flight (host memory stays bounded). The parent knows which shard each worker
holds: a worker that dies (killed, out of memory, a crash in the device runtime) has its shard handed to another,
and the job fails with :class:`~st_npu.runtime.pools.WorkerDiedError` only when no worker is left. Workers ignore
Ctrl-C (the parent stops them) and exit by themselves when the parent is gone (e.g. SIGKILLed).
With a single device the shards are embedded in this process, through the same :func:`embed_shard`. Each worker
runs torch on its share of this host's cores (unless ``OMP_NUM_THREADS`` says otherwise): workers that each
start one thread per core slow every one of them down.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from st_npu.corpus.encoder import ModelSettings, ShardEncoder, worker_threads
from st_npu.corpus.reader import Shard
from st_npu.corpus.shards import ShardFormat, ShardRecord, write_shard
from st_npu.corpus.storage import Location
from st_npu.errors import NonFiniteError
from st_npu.runtime import emulation
from st_npu.runtime.pools import POLL_S, WorkerDiedError, emulated_device_count, load_npu_in_worker


@dataclass(frozen=True)
class Done:
    """A finished shard, where and how fast it was embedded, its device's operator count (emulator only), and the
    torch threads of the process that embedded it."""

    record: ShardRecord
    device: str
    seconds: float
    ops: int | None
    threads: int | None = None


def embed_shard(encoder: ShardEncoder, shard: Shard, folder: Location, form: ShardFormat,
                on_rows: Callable[[int], None] | None = None) -> Done:
    import torch

    started = time.perf_counter()
    try:
        vectors = encoder.encode(shard.texts, on_rows)
    except NonFiniteError as exc:  # named by the rows of the whole input, as the job's other errors are
        raise NonFiniteError([shard.rows[index] for index in exc.indices], exc.count, exc.dtype,
                             f"embed-corpus's shard {shard.index} (indices are input rows)") from None
    record = write_shard(folder, shard.index, shard.start, shard.end, shard.ids, vectors, shard.keep, form)
    return Done(record, encoder.device, time.perf_counter() - started, device_ops(encoder.device),
                torch.get_num_threads())


def device_ops(device: str) -> int | None:
    """Operators run on an emulated ``npu:N`` so far in this process; None on a real or non-npu device."""
    counted = emulation.counters(device)
    return None if counted is None else counted.ops


def run_here(encoder: ShardEncoder, shards: Iterator[Shard], folder: Location, form: ShardFormat,
             on_ready: Callable[[dict[str, Any]], None], on_done: Callable[[Done], None],
             on_rows: Callable[[int], None]) -> None:
    on_ready(encoder.describe())
    for shard in shards:
        on_done(embed_shard(encoder, shard, folder, form, on_rows))


def run_processes(devices: list[str], settings: ModelSettings, shards: Iterator[Shard], folder: Location,
                  form: ShardFormat, on_ready: Callable[[dict[str, Any]], None], on_done: Callable[[Done], None],
                  on_rows: Callable[[int], None]) -> None:
    context = multiprocessing.get_context("spawn")  # NPU runtimes cannot be re-initialised in a forked child
    results = context.Queue()
    emulated = emulated_device_count()
    threads = None if os.environ.get("OMP_NUM_THREADS") else worker_threads(len(devices))
    workers = []
    for slot, device in enumerate(devices):
        inbox = context.Queue()
        process = context.Process(target=_worker_main, name=f"st-npu-corpus-{device}", daemon=True,
                                  args=(slot, device, emulated, threads, settings, folder, form, inbox, results))
        process.start()
        workers.append(_Worker(slot, device, process, inbox))
    try:
        _dispatch(workers, results, shards, on_ready, on_done, on_rows)
    finally:
        _stop(workers)


@dataclass
class _Worker:
    slot: int
    device: str
    process: Any
    inbox: Any
    ready: bool = False
    shard: Shard | None = None
    gone: bool = False
    rows: int = 0  # rows of its shard embedded so far, as reported


def _dispatch(workers: list[_Worker], results: Any, shards: Iterator[Shard],
              on_ready: Callable[[dict[str, Any]], None], on_done: Callable[[Done], None],
              on_rows: Callable[[int], None]) -> None:
    redo: deque[Shard] = deque()
    exhausted = False
    described = False
    while True:
        for worker in workers:
            if worker.ready and not worker.gone and worker.shard is None and not (exhausted and not redo):
                worker.shard = redo.popleft() if redo else next(shards, None)
                if worker.shard is None:
                    exhausted = True
                else:
                    worker.inbox.put(worker.shard)
        if exhausted and not redo and all(worker.shard is None for worker in workers):
            return
        try:
            kind, slot, payload = results.get(timeout=POLL_S)
        except queue.Empty:
            _reclaim_dead(workers, redo, on_rows)
            continue
        worker = workers[slot]
        if kind == "error":
            raise payload
        if kind == "failed":
            raise RuntimeError(f"corpus worker on {worker.device} failed: {payload}")
        if kind == "ready":
            worker.ready = True
            if not described:
                on_ready(payload)
                described = True
        elif kind == "rows":
            worker.rows += payload
            on_rows(payload)
        else:
            worker.shard, worker.rows = None, 0
            on_done(payload)


def _reclaim_dead(workers: list[_Worker], redo: deque[Shard], on_rows: Callable[[int], None]) -> None:
    for worker in workers:
        if worker.gone or worker.process.is_alive():
            continue
        worker.gone = True
        code = worker.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if worker.shard is not None:
            print(f"st-npu embed-corpus: the worker on {worker.device} died ({how}); its shard "
                  f"{worker.shard.index} goes to another worker", file=sys.stderr)
            redo.appendleft(worker.shard)
            on_rows(-worker.rows)  # another worker embeds them again
            worker.shard, worker.rows = None, 0
    if all(worker.gone for worker in workers):
        raise WorkerDiedError(f"every corpus worker died ({', '.join(w.device for w in workers)}); finished "
                              f"shards are kept: rerun the same command to resume")


def _stop(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.inbox.put(None)
    deadline = time.monotonic() + 5
    for worker in workers:
        worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=5)
        worker.inbox.cancel_join_thread()


def _worker_main(slot: int, device: str, emulated: int | None, threads: int | None, settings: ModelSettings,
                 folder: Location, form: ShardFormat, inbox: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        if device.startswith("npu"):
            load_npu_in_worker(device, emulated)
        encoder = ShardEncoder(settings, device)
        results.put(("ready", slot, encoder.describe()))
        parent = multiprocessing.parent_process()
        while True:
            try:
                shard = inbox.get(timeout=POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if shard is None:
                return
            done = embed_shard(encoder, shard, folder, form, lambda rows: results.put(("rows", slot, rows)))
            results.put(("done", slot, done))
    except NonFiniteError as exc:  # the user's to fix (the dtype): the parent reports it as it is
        results.put(("error", slot, exc))
    except Exception:
        results.put(("failed", slot, traceback.format_exc(limit=8)))
