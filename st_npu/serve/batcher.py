"""The request batcher: many clients' requests gathered into bucket-shaped batches, one worker per device.

Requests wait in one queue shared by every device of one model (an embedder's and a reranker's batchers are
separate, and so are any two models', so their batches never mix). A device's worker takes rows from the oldest request, then from every
waiting request with the same options, while the padded batch stays under the token budget
(``max_batch_tokens``: bucketed rows x bucketed longest text, as static shapes will pad it) and ``max_batch_size``,
and runs them as one device call. A request with more rows than one batch holds is cut: its first rows run, and
the rest go to the back of the queue, so a request that arrived behind it waits for at most one batch. There is no
batching window: while a device computes, requests pile up and the next batch takes them all.

Each queue entry carries its rows already tokenised at admission (:mod:`st_npu.serve.tokens`), as
text-embeddings-inference's entries carry their encodings, down to :meth:`Batcher.device_call`, the one place that
hands them to the model. A request whose client went away is dropped before its next rows reach a device, and a
request past its deadline before its first rows do (one already on a device finishes).
A batch that fails is retried request by request, so one bad request fails alone.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from st_npu.engine import ShapePolicy, engine_of
from st_npu.errors import InvalidValueError


_warmup_locks: dict[str, threading.Lock] = {}  # one per device: models sharing a device warm up one after another
_warmup_locks_guard = threading.Lock()


def _warmup_lock(device: Any) -> threading.Lock:
    with _warmup_locks_guard:
        return _warmup_locks.setdefault(str(device), threading.Lock())


class QueueFull(Exception):
    """More requests are queued or computing than ``max_concurrent_requests`` allows, or the server is stopping."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before any of its rows reached a device."""


@dataclass
class Job:
    """One request: its rows (texts or pairs, already cut to the model's limit) and their token ids."""

    rows: list[Any]
    encodings: list[list[int]]
    options: tuple = ()  # requests batch together only when their options are equal (e.g. the prompt)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # time.perf_counter() past which its rows are not started
    started_at: float | None = None
    compute_s: float = 0.0
    taken: int = 0  # rows handed to a device so far
    finished: int = 0  # rows whose results are in
    abandoned: bool = False
    yielded: bool = False  # the rest of a cut request was passed over once for requests behind it
    error: BaseException | None = None  # the failure that ended it, given to its client once no rows run
    _results: list[Any] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.encodings)


class Batcher:
    """Runs queued jobs on ``models`` (one per device), one worker thread each, after each has warmed up.

    ``max_batch_requests=1`` turns batching off: each request is its own device call, one at a time per device
    (the baseline that ``st-npu bench-serve`` compares against). ``kind`` is ``"embed"``, ``"rerank"`` or
    ``"sparse"``; ``name`` labels the model's metrics (its kind by default).
    """

    def __init__(self, models: list[Any], max_batch_tokens: int, max_batch_size: int, max_concurrent_requests: int,
                 max_batch_requests: int | None = None, metrics: Any = None, kind: str = "embed",
                 name: str | None = None) -> None:
        self.models = models
        self.kind = kind
        self.name = name or kind
        self.max_seq_length = max_length(models[0])
        if max_batch_tokens < self.max_seq_length:
            raise InvalidValueError(f"--max-batch-tokens ({max_batch_tokens}) must be at least the model's maximum "
                                    f"input length ({self.max_seq_length}), or a long text could never run")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        # The static-shape buckets when they are on; elsewhere the same table only prices a batch for the budget.
        for model in models:  # one budget: the engine's batches and warm-up stay under --max-batch-tokens too
            if engine_of(model) is not None:
                engine_of(model).max_batch_tokens = max_batch_tokens
        engine = engine_of(models[0])
        policy = engine.policy if engine is not None else None
        self.policy = policy or ShapePolicy().for_model(self.max_seq_length)
        self.static_shapes = policy is not None
        self._pending: deque[Job] = deque()
        self._admitted = 0  # jobs queued or computing
        self._condition = threading.Condition()
        self._closing = False
        self._warm = [threading.Event() for _ in models]
        self.failure: BaseException | None = None  # a warm-up that failed: this model answers nothing
        self._threads = [threading.Thread(target=self._work, args=(index,), name=f"st_npu-{kind}-{model.device}",
                                          daemon=True) for index, model in enumerate(models)]

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def ready(self) -> bool:
        return self.failure is None and all(event.is_set() for event in self._warm)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let each worker finish its batch, and cancel what never reached a device.

        Waits at most ``timeout`` seconds for the workers (they are daemon threads: the process may exit
        while one still computes)."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._drop_pending(QueueFull("the server stopped before this request reached a device"))
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _drop_pending(self, error: BaseException) -> None:
        with self._condition:
            dropped, self._pending = list(self._pending), deque()
        for job in dropped:
            with self._condition:
                job.abandoned = True
                job.error = job.error or error
                if job.finished == job.taken:
                    self._fail(job)

    # --- requests -----------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        with self._condition:
            if self.failure is not None:
                raise QueueFull(f"this model failed its warm-up: {type(self.failure).__name__}: {self.failure}")
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self._admitted >= self.max_concurrent_requests:
                raise QueueFull(f"{self._admitted} requests are already queued or computing "
                                f"(--max-concurrent-requests {self.max_concurrent_requests})")
            self._admitted += 1
            job._results = [None] * len(job.rows)
            self._pending.append(job)
            self._count_queue()
            self._condition.notify()
        job.future.add_done_callback(self._release)
        return job.future

    def abandon(self, job: Job) -> None:
        """The client went away: rows not yet on a device are never computed."""
        with self._condition:
            job.abandoned = True
            waiting = job.taken == 0 and job in self._pending
            if waiting:
                self._pending.remove(job)
        if waiting:
            job.future.cancel()

    def expire(self, job: Job) -> bool:
        """The job's deadline passed: drop it if none of its rows reached a device (True), else let it finish."""
        with self._condition:
            if job.taken:
                return False
            self._expire(job)
            self._count_queue()
            return True

    def _expire(self, job: Job) -> None:
        job.abandoned = True
        job.error = job.error or DeadlineExceeded("the request's deadline passed before it reached a device")
        if job in self._pending:
            self._pending.remove(job)
        self._fail(job)

    def _count_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size(self.name, sum(len(job.rows) - job.taken for job in self._pending))

    def _release(self, _future: Future) -> None:
        with self._condition:
            self._admitted -= 1

    def rows_that_fit(self, longest: int) -> int:
        """The most rows one forward may hold when its longest row has ``longest`` tokens."""
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
        try:
            with _warmup_lock(model.device):  # a device captures one graph at a time
                self._warmup(model)
        except Exception as exc:  # /health names it; requests to this model are refused (503)
            self.failure = exc
            self._drop_pending(QueueFull(f"the model failed its warm-up: {type(exc).__name__}: {exc}"))
            return
        self._warm[index].set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(model, batch)

    def _warmup(self, model: Any) -> None:
        if self.static_shapes:  # every bucket shape a batch under the budget can take, compiled and captured now
            engine_of(model).warmup(self.max_batch_size, max_tokens=self.max_batch_tokens)
        elif self.kind == "rerank":
            model.predict([("warm-up", "warm-up")], show_progress_bar=False)
        elif self.kind == "sparse":
            model.encode(["warm-up"], show_progress_bar=False, convert_to_sparse_tensor=False)
        else:
            model.encode(["warm-up"], show_progress_bar=False)

    def _next_batch(self) -> list[tuple[Job, slice]] | None:
        with self._condition:
            while True:
                while not self._pending:
                    if self._closing:
                        return None
                    self._condition.wait()
                batch = self._take_batch()
                if batch:  # empty when every job taken had been abandoned by its client
                    return batch

    def _take_batch(self) -> list[tuple[Job, slice]]:
        """Rows for one device call: whole requests while they fit, then the first rows of one that does not.

        The rest of a cut request yields once to every request that has not started (so a request that arrives
        while a large one computes waits for one batch of it at most), then goes first."""
        waiting = list(self._pending)
        order = ([job for job in waiting if job.taken and job.yielded] + [job for job in waiting if not job.taken]
                 + [job for job in waiting if job.taken and not job.yielded])
        batch: list[tuple[Job, slice]] = []
        rows = longest = 0
        kept: list[Job] = []
        now = time.perf_counter()
        for job in order:
            if job.abandoned or job.future.cancelled():
                self._drop(job)
                continue
            if not job.taken and job.deadline is not None and now > job.deadline:
                self._expire(job)
                continue
            if batch and (job.options != batch[0][0].options or batch[-1][0].taken < len(batch[-1][0].rows) or (
                    self.max_batch_requests is not None and len(batch) >= self.max_batch_requests)):
                kept.append(job)
                continue
            take = 0
            for ids in job.encodings[job.taken:]:
                if (take or batch) and not self._fits(rows + take + 1, max(longest, len(ids))):
                    break
                if batch and job.taken and self.policy.seq_bucket(len(ids)) > self.policy.seq_bucket(longest):
                    break  # the rest of a cut request may fill a batch, not lengthen it
                take, longest = take + 1, max(longest, len(ids))
            if take == 0 or (job.taken == 0 and not job.future.set_running_or_notify_cancel()):
                if job.future.cancelled():  # cancelled just now
                    self._drop(job)
                else:
                    kept.append(job)
                continue
            if job.started_at is None:
                job.started_at = time.perf_counter()
            batch.append((job, slice(job.taken, job.taken + take)))
            job.taken += take
            rows += take
        for job in kept:
            job.yielded = bool(job.taken)  # a cut request passed over now goes first next time
        for job, _ in batch:
            job.yielded = False
        self._pending = deque(kept + [job for job, _ in batch if job.taken < len(job.rows)])
        self._count_queue()
        return batch

    def _drop(self, job: Job) -> None:
        """An abandoned job leaves the queue; its future ends once no rows of it are on a device."""
        if job.finished == job.taken:
            self._fail(job)

    def _run(self, model: Any, batch: list[tuple[Job, slice]]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._call(model, batch)
        except Exception as exc:
            if len(batch) == 1:
                self._settle(batch[0], exc)
                return
            for part in batch:  # find the request that broke the batch; the others still get their rows
                try:
                    self._settle(part, self._call(model, [part]))
                except Exception as alone:
                    self._settle(part, alone)
            return
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_batch(self.name, str(model.device), batch, elapsed, started)
        start = 0
        for job, rows in batch:
            count = rows.stop - rows.start
            job.compute_s += elapsed
            self._settle((job, rows), outputs[start : start + count])
            start += count

    def _call(self, model: Any, batch: list[tuple[Job, slice]]) -> list[Any]:
        rows = [row for job, part in batch for row in job.rows[part]]
        encodings = [ids for job, part in batch for ids in job.encodings[part]]
        return self.device_call(model, rows, encodings, batch[0][0].options)

    def device_call(self, model: Any, rows: list[Any], encodings: list[list[int]], options: tuple) -> list[Any]:
        """The one call into the model for a batch: ``rows`` as admitted (cut to the limit) and their token ids.

        The engine takes the admission's token ids as the call's tokens (``Engine.tokens_from_ids``), so the rows are
        not tokenised again; only where it cannot (token embeddings, a model without the engine, ids that stock
        would tokenise differently) does the call tokenise, and the metrics count it."""
        if self.kind == "rerank":
            import torch

            entry = {"activation_fn": torch.nn.Identity()}
            run = functools.partial(model.predict, rows, batch_size=len(rows), convert_to_numpy=True,
                                    show_progress_bar=False, **entry)
        elif self.kind == "sparse":
            entry = {"prompt_name": options[0]}
            run = functools.partial(self._sparse_rows, model, rows, options[0])
        else:
            prompt_name, output = options
            entry = {"prompt_name": prompt_name}
            if output == "tokens":
                run = functools.partial(self._token_rows, model, rows, prompt_name)
            else:
                run = functools.partial(model.encode, rows, batch_size=len(rows), convert_to_numpy=True,
                                        show_progress_bar=False, **entry)
        engine = engine_of(model)
        tokens = None
        if engine is not None and (self.kind == "rerank" or options[1] != "tokens"):
            tokens = engine.tokens_from_ids(rows, encodings, **entry)
        if tokens is None:
            if self.metrics is not None:
                self.metrics.tokenizations.labels(self.name, "device").inc(len(rows))
            return list(run())
        with engine.given_tokens(tokens):
            return list(run())

    @staticmethod
    def _token_rows(model: Any, rows: list[Any], prompt_name: str | None) -> list[Any]:
        return [np.asarray(t.float().cpu()) for t in model.encode(
            rows, prompt_name=prompt_name, batch_size=len(rows), output_value="token_embeddings",
            show_progress_bar=False)]

    @staticmethod
    def _sparse_rows(model: Any, rows: list[Any], prompt_name: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's non-zero entries (vocabulary indices, ascending, and their weights), as TEI's /embed_sparse
        gives them."""
        dense = model.encode(rows, prompt_name=prompt_name, batch_size=len(rows), convert_to_tensor=True,
                             convert_to_sparse_tensor=False, show_progress_bar=False)
        answer = []
        for row in dense.float().cpu().numpy():
            indices = np.flatnonzero(row)
            answer.append((indices, row[indices]))
        return answer

    def _settle(self, part: tuple[Job, slice], outcome: Any) -> None:
        job, rows = part
        with self._condition:  # a re-entrant lock: the future's callbacks take it again in this thread
            job.finished += rows.stop - rows.start
            if isinstance(outcome, BaseException):
                job.abandoned = True  # its other rows need not run
                job.error = job.error or outcome
            else:
                job._results[rows] = outcome
            if job.future.done():
                return
            if job.abandoned:
                if job.finished == job.taken and job not in self._pending:
                    self._fail(job)
            elif job.finished == len(job.rows):
                job.future.set_result(job._results)

    @staticmethod
    def _fail(job: Job) -> None:
        if job.future.done() or (job.error is None and job.future.cancel()):
            return
        if job.future.running() or job.future.set_running_or_notify_cancel():
            job.future.set_exception(job.error or CancelledError())


def max_length(model: Any) -> int:
    """The model's token limit: ``max_seq_length`` (SentenceTransformer, CrossEncoder 5+), else ``max_length``."""
    limit = getattr(model, "max_seq_length", None)
    return int(limit if limit is not None else model.max_length)
