"""Multi-process pools on many NPUs: stock's pool, with NPU workers that load their backend and a parent that
notices a dead worker.

``start_pool`` wraps stock's ``start_multi_process_pool``; ``st_npu.SentenceTransformer`` uses it, and so does
stock's class while ``st_npu.patch()`` is active.
"""

from __future__ import annotations

import ast
import multiprocessing
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from st_npu.runtime import emulation
from st_npu.runtime.devices import load_torch_npu, names_npu, npu_count, resolve_device

# How often a pool's result queue is re-read while waiting, to look for dead workers in between.
POLL_S = 1.0
# A probe worker re-runs the top level of a script without main guard; a script that runs longer than this
# before starting its pool is given the benefit of the doubt.
PROBE_TIMEOUT_S = 120.0


class WorkerDiedError(RuntimeError):
    """A multi-process pool worker exited while the parent waited for results; the pool has been stopped."""


def start_pool(target_devices: Sequence[str | torch.device] | None, start: Callable[[list[str] | None], dict]) -> dict:
    """Stock's ``start_multi_process_pool`` (``start``), made fit for NPUs.

    - ``target_devices=None`` means every NPU when one is usable (else stock's default); ``npu``/``npu:N`` entries
      are checked in the parent, so a wrong index fails before any worker is spawned.
    - Each spawned worker loads the npu backend (torch_npu, or the parent's emulator: a parent that installed it
      in-process without ``ST_NPU_EMULATE`` still gets workers with it) before it unpickles the model.
    - A worker that dies makes the parent raise ``WorkerDiedError`` within about ``POLL_S`` seconds, on 5.x too
      (whose stock waits forever), and stops the pool's other workers; one that would die while starting, because
      the script has no main guard, is found first (:func:`check_main_reimports`).

    Safe to apply twice (an ``st_npu.SentenceTransformer`` under the patch goes through it twice).
    """
    devices = pool_devices(target_devices)
    check_main_reimports()
    pool = start(devices)
    if not isinstance(pool["output"], WatchedResults):
        pool["output"] = WatchedResults(pool["output"], pool["input"], pool["processes"], devices)
    return pool


def check_main_reimports() -> None:
    """Raise ``WorkerDiedError`` when a spawned worker cannot get past importing this process's main script.

    A spawned worker imports the parent's ``__main__`` script before it reads anything else. A script without
    ``if __name__ == "__main__":`` then starts a pool of its own inside the worker, and the worker dies of
    Python's bootstrapping error while the parent, writing the pickled model into the worker's pipe, blocks in
    ``Process.start`` forever. So a guard-less script is first tried with a worker that carries nothing.
    """
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path is None or has_main_guard(Path(path)):
        return
    probe = multiprocessing.get_context("spawn").Process(target=_started, name="st_npu-pool-probe", daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    if probe.exitcode is None:  # still running the script's top level: nothing to tell yet, let the pool try
        probe.terminate()
        return
    if probe.exitcode != 0:
        raise WorkerDiedError(
            f"A multi-process pool worker (pid {probe.pid}) died while starting, with exit code {probe.exitcode} "
            f"(its error is printed above): a spawned worker first imports your script {path}, which has no "
            f'`if __name__ == "__main__":` guard, so the worker re-ran it and tried to start a pool of its own. '
            f'Put the code that starts the pool (encode with a list of devices, start_multi_process_pool) under '
            f'`if __name__ == "__main__":`.'
        )


def has_main_guard(script: Path) -> bool:
    """Whether a script compares ``__name__`` with ``"__main__"`` anywhere (unreadable: assume it does)."""
    try:
        tree = ast.parse(script.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.comparators) == 1:
            sides = [node.left, node.comparators[0]]
            if any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides) and any(
                    isinstance(side, ast.Constant) and side.value == "__main__" for side in sides):
                return True
    return False


def _started() -> None:
    """A probe worker's whole task: having got this far, the main script imports fine in a worker."""


def pool_devices(target_devices: Sequence[str | torch.device] | None) -> list[str] | None:
    """The devices a pool should use: every NPU by default, each NPU entry resolved and worker-ready."""
    if target_devices is None:
        count = npu_count()
        return [_NpuWorkerDevice(f"npu:{index}") for index in range(count)] if count else None
    return [_NpuWorkerDevice(str(resolve_device(device))) if names_npu(device) else str(device)
            for device in target_devices]


class _NpuWorkerDevice(str):
    """An ``npu:N`` string that, unpickled in a spawned worker, first makes ``npu`` a device there.

    Stock passes each target device to its worker ahead of the model, so this is the one public hook that runs
    in the worker before anything else needs the backend.
    """

    def __reduce__(self) -> tuple[Callable[..., str], tuple[str, int | None]]:
        return load_npu_in_worker, (str(self), emulated_device_count())


def emulated_device_count() -> int | None:
    # The machine's count: the worker inherits ASCEND_RT_VISIBLE_DEVICES and applies it itself, as on Ascend.
    return emulation.physical_device_count()


def load_npu_in_worker(device: str, emulated_devices: int | None) -> str:
    # torch's backend autoload already honoured ST_NPU_EMULATE in this worker, if it was set.
    if emulated_devices is not None:
        emulation.ensure_installed(emulated_devices)
    load_torch_npu()
    return device


class WatchedResults:
    """A pool's result queue whose ``get`` raises ``WorkerDiedError`` once a worker has died.

    Stock 5.x reads results with a blocking ``get()`` and hangs forever when a worker dies (killed, out of
    memory, a crash in the device runtime); 6.x notices only once the queue has stayed empty. Both read the
    pool's ``"output"`` entry, so replacing it covers both. Every other attribute is the queue's own.
    """

    def __init__(self, results: Any, inputs: Any, processes: list[Any], devices: list[str] | None) -> None:
        self._results = results
        self._inputs = inputs
        self._processes = processes
        self._devices = devices

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_workers()
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            try:
                return self._results.get(block, wait)
            except queue.Empty:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise
            except (EOFError, ConnectionError):
                # torch passes a result's tensors through the sending worker's file descriptors: one that died
                # while its result was on the way breaks the transfer. Report the death, not the broken pipe.
                self._await_death()
                raise

    def _await_death(self) -> None:
        """Raise ``WorkerDiedError`` once a worker is seen dead, within a few polls; return if none dies."""
        give_up = time.monotonic() + 5 * POLL_S
        while time.monotonic() < give_up:
            self._check_workers()
            time.sleep(POLL_S / 20)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._results, name)

    def _check_workers(self) -> None:
        # A pool with a dead worker is broken even if the others could finish: fail at once, not at the end.
        dead = [index for index, process in enumerate(self._processes) if not process.is_alive()]
        if not dead:
            return
        details = "; ".join(self._describe(index) for index in dead)
        _stop_workers(self._processes, self._inputs)
        raise WorkerDiedError(
            f"{len(dead)} of {len(self._processes)} multi-process pool worker(s) died: {details}. "
            f"The pool's workers have been stopped; start a new pool to retry."
        )

    def _describe(self, index: int) -> str:
        process = self._processes[index]
        where = f" on {self._devices[index]}" if self._devices and index < len(self._devices) else ""
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
            return f"pid {process.pid}{where} was killed by {name}{hint}"
        return f"pid {process.pid}{where} exited with code {code}"


def _stop_workers(processes: list[Any], inputs: Any) -> None:
    """Terminate and reap a pool's workers, leaving the pool for ``stop_multi_process_pool`` to close."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
    # Chunks no worker will read stay in the pipe: without this, interpreter exit waits to flush them forever.
    inputs.cancel_join_thread()
