"""The per-call context: what one ``encode``/``predict`` call carries from its entry down to each batch's forward.

A call's tokens (computed once), its tails (``normalize``/``truncate_dim`` applied in the forward, on the padded
batch), its prefetcher, and the batch in flight between ``preprocess`` and ``forward`` (its padding and the graph it
was staged into) live in one :class:`Call`. The only thread-local state of the engine is the stack of calls each
thread is running, per model: concurrent calls in other threads have calls of their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_local = threading.local()


@dataclass
class Batch:
    """A padded batch between ``preprocess`` and ``forward``: how to cut its outputs back, and its graph."""

    target: tuple[int, int]  # (rows, tokens) after padding
    rows: int
    length: int
    left: bool
    padded: tuple[str, ...]  # the per-token input keys that were padded
    staged: Any = None  # the captured graph holding this batch's inputs, from staging to its replay
    positions: list[int] | None = None  # each real row's input index in the call (for errors that name it)


@dataclass
class Call:
    """One entry call (``encode``, ``predict``) on one thread."""

    tokens: Any = None  # engine.tokens.Tokens of the call's inputs, when they were tokenised up front
    tails: Any = None  # engine.static_shapes.Tails: the call wants host rows, with these tails applied
    prefetcher: Any = None  # engine.overlap.Prefetcher preparing the next batches
    batch: Batch | None = None


def current(owner: Any) -> Call | None:
    """The innermost call ``owner`` (an engine) is running in this thread, if any."""
    stack = getattr(_local, "calls", {}).get(id(owner))
    return stack[-1] if stack else None


@contextlib.contextmanager
def calling(owner: Any, call: Call) -> Iterator[Call]:
    calls = _local.__dict__.setdefault("calls", {})
    stack = calls.setdefault(id(owner), [])
    stack.append(call)
    try:
        yield call
    finally:
        stack.pop()
        if not stack:
            del calls[id(owner)]
