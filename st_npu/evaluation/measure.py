"""Measuring instruments shared by the benchmarks: device-synchronized timers, peak memory, compile counts, the
device's matmul peak and percentiles.

* Batch latency is the forward of one batch: a pre-hook on the first module and a hook on the last, each after a
  device synchronize, so it excludes tokenization and the copy back; the synchronize costs every model the same.
* Peak memory is what a pass adds over what was resident before it: on an accelerator ``max_memory_allocated``
  minus ``memory_allocated`` just before, on the CPU the highest RSS a thread reads from ``/proc/self/statm``
  every 5 ms minus RSS just before. The CPU figure matches the kernel's ``ru_maxrss`` in a fresh process to
  ~2 MiB; where several models share one heap, what earlier passes leave in it inflates a single pass by up to
  ~20 % (never deflates it), so compare the lowest peak over several passes.
* Compilations are counted where they can be: on the emulated npu, per device.

On the emulated npu (``st_npu.emulator.backend``) times, FLOP/s, the matmul peak and memory are those of CPU
operators behind the emulated device and say nothing about an Ascend chip; only the counts are meaningful.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from st_npu.runtime import emulation

PEAK_MATMUL_SIZE = 2048
PEAK_MATMUL_REPEATS = 3
RSS_INTERVAL_S = 0.005


def synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(module, "synchronize"):
        module.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = PEAK_MATMUL_SIZE,
                      repeats: int = PEAK_MATMUL_REPEATS) -> float:
    """FLOP/s of the fastest of ``repeats`` ``size`` x ``size`` matmuls, after one untimed run."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class BatchTimer:
    """Times each forward from the first module's input to the last module's output, and counts its tokens."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.device = device
        self.latencies_s: list[float] = []
        self.computed_tokens = 0
        self._start = 0.0
        self._hooks = [model[0].register_forward_pre_hook(self._before), model[-1].register_forward_hook(self._after)]

    def _before(self, module: Any, args: tuple) -> None:
        ids = args[0].get("input_ids") if args and isinstance(args[0], Mapping) else None
        self.computed_tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0
        synchronize(self.device)  # the batch's transfer (and anything queued before) is not its forward
        self._start = time.perf_counter()

    def _after(self, module: Any, args: tuple, output: Any) -> None:
        synchronize(self.device)
        self.latencies_s.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class RssSampler:
    """The highest resident set size above its level at ``start``, read from /proc/self/statm by a thread."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        _trim_heap()
        self.baseline = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="st_npu-bench-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        """The peak increase in bytes since ``start``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak - self.baseline


class DevicePeakMemory:
    """An accelerator's peak allocated memory above its level at ``start`` (npu, cuda, ...: ``torch.<type>``)."""

    def __init__(self, device: torch.device) -> None:
        self.module = getattr(torch, device.type)
        self.index = device.index or 0
        self.baseline = 0

    def start(self) -> None:
        self.module.reset_peak_memory_stats(self.index)
        self.baseline = self.module.memory_allocated(self.index)

    def stop(self) -> int:
        return self.module.max_memory_allocated(self.index) - self.baseline

    def allocated(self) -> int:
        return self.module.memory_allocated(self.index)


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    # glibc keeps freed heap pages resident; without trimming, the model measured second would reuse the first's
    # pages and look smaller than it is.
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def memory_meter(device: torch.device) -> RssSampler | DevicePeakMemory | None:
    """How this device's peak memory can be measured; None where it cannot (mps, or a CPU without /proc)."""
    if device.type == "cpu":
        return RssSampler() if os.path.exists("/proc/self/statm") else None
    module = getattr(torch, device.type, None)
    return DevicePeakMemory(device) if hasattr(module, "max_memory_allocated") else None


def compile_counter(device: torch.device) -> Callable[[], int] | None:
    """Compilations on ``device`` since the counter was made; only the emulated npu counts them."""
    if not emulation.is_emulated(device):
        return None
    emulation.reset_counters()
    return lambda: emulation.counters(device).compiles


def launch_counter(device: torch.device) -> Callable[[], dict[str, int]] | None:
    """Device launches (a graph replay is one) and graph replays on ``device`` since the counter was made; only the
    emulated npu counts them."""
    start = emulation.counters(device)
    if start is None:
        return None

    def since() -> dict[str, int]:
        counted = emulation.counters(device) - start
        return {"launches": counted.launches, "replays": counted.replays}

    return since


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None
