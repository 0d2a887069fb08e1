"""Host/device overlap: prepare the next batches on a CPU thread while the device runs the current one.

On an NPU the host is the bottleneck for short texts (the seed's ~25 ms per 23-sentence call): stock's loop
prepares a batch, runs it, copies it back, and only then prepares the next, so the device idles meanwhile.
Preparing a batch (its features cut from the call's tokens, padded to its bucket) is host work that a worker thread
can do ahead.

Stock's loop is not copied: it still decides the batches and calls ``preprocess`` once per batch. The engine
predicts that order (``_compat.predicted_batches``) and tells the prefetcher (``expect``); a prepared result is
handed back only when the batch stock asks for is exactly the predicted one, anything else is prepared on the spot.
A prediction that drifts from upstream therefore costs speed, never correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

AHEAD = 2  # batches prepared ahead: one in flight while one waits, bounded host memory


class Prefetcher:
    """Serves ``prepare(batch, **kwargs)`` calls for one call, in the predicted order."""

    def __init__(self, prepare: Callable[..., Any]) -> None:
        self.prepare = prepare
        self.batches: list[list[Any]] = []
        self.position = 0
        self.kwargs: dict[str, Any] | None = None
        self.futures: dict[int, Future] = {}
        self.executor: ThreadPoolExecutor | None = None
        self.hits = 0
        self.misses = 0

    def expect(self, batches: list[list[Any]]) -> None:
        """The batches stock is about to ask for, in order (work prepared for earlier ones is dropped)."""
        self._drop()
        self.batches, self.position = batches, 0

    def __call__(self, inputs: list[Any], **kwargs: Any) -> Any:
        expected = self.batches[self.position] if self.position < len(self.batches) else None
        if expected is None or inputs != expected or (self.kwargs is not None and kwargs != self.kwargs):
            self.misses += 1
            self._drop()
            self.batches = []
            return self.prepare(inputs, **kwargs)
        self.kwargs = kwargs  # the first call tells which prompt and options stock passes
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st_npu-prepare")
        prefetched = self.position in self.futures
        for ahead in range(self.position, min(self.position + 1 + AHEAD, len(self.batches))):
            if ahead not in self.futures:
                self.futures[ahead] = self.executor.submit(self.prepare, self.batches[ahead], **kwargs)
        future = self.futures.pop(self.position)
        self.position += 1
        self.hits += prefetched
        return future.result()

    def _drop(self) -> None:
        for future in self.futures.values():
            future.cancel()
        for future in self.futures.values():
            if not future.cancelled():
                future.exception()  # wait for work already running; its result is not needed
        self.futures.clear()

    def close(self) -> None:
        """Wait for in-flight work and stop the thread; results not asked for are dropped."""
        self._drop()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
