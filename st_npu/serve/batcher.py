"""The request batcher: many clients' requests gathered into bucket-shaped batches, one worker per device.

Requests wait in one queue shared by every device. A device's worker takes the oldest request, adds every waiting
request with the same options (prompt, normalize) while the padded batch stays under the token budget
(``max_batch_tokens``: bucketed rows x bucketed longest text, as static shapes will pad it) and ``max_batch_size``,
and runs them as one ``model.encode`` call. There is no batching window: while a device computes, requests pile
up and the next batch takes them all, so a lone client waits for nobody and a crowd fills the batches.

Texts are tokenised for their lengths before they are queued, by the caller's thread, not the device's: the
budget, the refusal of over-long texts and the token counts come from there. ``encode`` then tokenises its batch
again (that is how the model's public API is called); with a fast tokenizer that costs little next to a forward.

A batch that fails is retried request by request, so one bad request fails alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from st_npu.engine import ShapePolicy, engine_of


class QueueFull(Exception):
    """More requests are queued or computing than ``max_concurrent_requests`` allows."""


@dataclass
class Job:
    texts: list[str]
    prompt_name: str | None
    normalize: bool
    longest: int  # tokens of its longest text, prompt and special tokens included, after truncation
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def options(self) -> tuple[str | None, bool]:
        return self.prompt_name, self.normalize


class Batcher:
    """Runs queued jobs on ``models`` (one per device), one worker thread each, after each has warmed up.

    ``max_batch_requests=1`` turns batching off: each request is its own ``encode`` call, one at a time per
    device (the baseline that ``st-npu bench-serve`` compares against).
    """

    def __init__(self, models: list[Any], max_batch_tokens: int, max_batch_size: int, max_concurrent_requests: int,
                 max_batch_requests: int | None = None, metrics: Any = None) -> None:
        self.models = models
        self.max_seq_length = models[0].max_seq_length
        if max_batch_tokens < self.max_seq_length:
            raise ValueError(f"--max-batch-tokens ({max_batch_tokens}) must be at least the model's maximum input "
                             f"length ({self.max_seq_length}), or a long text could never run")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        # The static-shape buckets when they are on; on the CPU the same table only prices a batch for the budget.
        engine = engine_of(models[0])
        policy = engine.policy if engine is not None else None
        self.policy = policy or ShapePolicy().for_model(self.max_seq_length)
        self.static_shapes = policy is not None
        self._pending: deque[Job] = deque()
        self._admitted = 0  # jobs queued or computing
        self._condition = threading.Condition()
        self._closing = False
        self._warm = [threading.Event() for _ in models]
        self._threads = [threading.Thread(target=self._work, args=(index,), name=f"st_npu-serve-{model.device}",
                                          daemon=True) for index, model in enumerate(models)]

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def ready(self) -> bool:
        return all(event.is_set() for event in self._warm)

    def close(self) -> None:
        """Finish every queued job, then stop the workers."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    # --- requests -----------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        with self._condition:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self._admitted >= self.max_concurrent_requests:
                raise QueueFull(f"{self._admitted} requests are already queued or computing "
                                f"(--max-concurrent-requests {self.max_concurrent_requests})")
            self._admitted += 1
            self._pending.append(job)
            self._condition.notify()
        job.future.add_done_callback(self._release)
        return job.future

    def _release(self, _future: Future) -> None:
        with self._condition:
            self._admitted -= 1

    def rows_that_fit(self, longest: int) -> int:
        """The most rows one forward may hold when its longest text has ``longest`` tokens."""
        seq = self.policy.seq_bucket(longest)
        fitting = [rows for rows in self.policy.batch_sizes
                   if rows <= self.max_batch_size and rows * seq <= self.max_batch_tokens]
        return max(fitting, default=1)

    def _fits(self, rows: int, longest: int) -> bool:
        return (rows <= self.max_batch_size
                and self.policy.batch_bucket(rows) * self.policy.seq_bucket(longest) <= self.max_batch_tokens)

    # --- the device workers -------------------------------------------------------------------------------------

    def _work(self, index: int) -> None:
        model = self.models[index]
        self._warmup(model)
        self._warm[index].set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(model, batch)

    def _warmup(self, model: Any) -> None:
        if self.static_shapes:  # every bucket shape a batch under the budget can take, compiled and captured now
            engine_of(model).warmup(self.max_batch_size, max_tokens=self.max_batch_tokens)
        else:
            model.encode(["warm-up"], show_progress_bar=False)

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while True:
                while not self._pending:
                    if self._closing:
                        return None
                    self._condition.wait()
                batch = self._take_batch()
                if batch:  # empty when every job taken had been cancelled by its client
                    return batch

    def _take_batch(self) -> list[Job]:
        batch: list[Job] = []
        rows = longest = 0
        kept: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            joins = not batch or (
                job.options == batch[0].options
                and self._fits(rows + len(job.texts), max(longest, job.longest))
                and (self.max_batch_requests is None or len(batch) < self.max_batch_requests))
            if not joins:
                kept.append(job)
            elif job.future.set_running_or_notify_cancel():  # False: its client went away
                batch.append(job)
                rows, longest = rows + len(job.texts), max(longest, job.longest)
        self._pending = kept
        return batch

    def _run(self, model: Any, batch: list[Job]) -> None:
        started = time.perf_counter()
        try:
            vectors = self._encode(model, batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for job in batch:  # find the request that broke the batch; the others still get their rows
                self._retry_alone(model, job)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(str(model.device), batch, time.perf_counter() - started, started)
        start = 0
        for job in batch:
            job.future.set_result(vectors[start : start + len(job.texts)])
            start += len(job.texts)

    def _retry_alone(self, model: Any, job: Job) -> None:
        try:
            vectors = self._encode(model, [job])
        except Exception as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(vectors)

    def _encode(self, model: Any, batch: list[Job]) -> np.ndarray:
        texts = [text for job in batch for text in job.texts]
        prompt_name, normalize = batch[0].options
        vectors = model.encode(texts, prompt_name=prompt_name, normalize_embeddings=normalize,
                               batch_size=self.rows_that_fit(max(job.longest for job in batch)),
                               convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
