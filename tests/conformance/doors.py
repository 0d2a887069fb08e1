"""Conformance with stock sentence-transformers: each test body runs once against stock on the CPU (the
reference) and once through each of st_npu's doors, and the results must be the same.

The doors: ``cpu`` (``st_npu.SentenceTransformer`` on the CPU), ``npu`` (the same class on the emulated npu) and
``patch`` (stock's class under ``st_npu.patch()`` on the emulated npu). "The same" means: arrays and tensors of the
same type, dtype and shape with values within 1e-6 (compute differs: the npu door pads to static shapes), other
values equal (quantised integers may differ by one step in 1% of values: see ``assert_values``), and an exception of stock's type (a subclass is fine). The emulated npu proves plumbing, shapes and
transfers, not Ascend kernels or numerics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import sentence_transformers
import torch

import st_npu

TOLERANCE = 1e-6
TEXTS = ["Hello world", "A man is eating food.", "今天天气很好", "x", "a somewhat longer sentence " * 6, ""]


@dataclass(frozen=True)
class Door:
    """How a test body builds its models: ``cls(path, device=door.device, ...)``."""

    name: str
    cls: type
    device: str

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.name != "patch":
            yield
            return
        with st_npu.patch():
            yield

    def load(self, path: Any, **kwargs: Any) -> Any:
        return self.cls(str(path), device=self.device, **kwargs)

    def build(self, class_name: str, *args: Any, **kwargs: Any) -> Any:
        """A model of stock's class ``class_name`` built through this door, on its device: st_npu's own class where
        it has one (cpu, npu), else stock's class under ``st_npu.patch()``, the way st_npu takes it."""
        stock = getattr(sentence_transformers, class_name)
        kwargs.setdefault("device", self.device)
        own = OWN_CLASSES.get(class_name)
        if self.name in ("stock", "patch"):
            return stock(*args, **kwargs)
        if own is not None:
            return own(*args, **kwargs)
        with st_npu.patch():
            return stock(*args, **kwargs)


OWN_CLASSES = {"SentenceTransformer": st_npu.SentenceTransformer, "CrossEncoder": st_npu.CrossEncoder}


STOCK = Door("stock", sentence_transformers.SentenceTransformer, "cpu")
DOORS = {
    "cpu": Door("cpu", st_npu.SentenceTransformer, "cpu"),
    "npu": Door("npu", st_npu.SentenceTransformer, "npu"),
    "patch": Door("patch", sentence_transformers.SentenceTransformer, "npu"),
}


@dataclass(frozen=True)
class Raised:
    error: BaseException


def outcome(body: Callable[[Door], Any], door: Door) -> Any:
    try:
        with door.active():
            return body(door)
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return Raised(exc)


def assert_same(expected: Any, got: Any, where: str = "result") -> None:
    if isinstance(expected, Raised):
        assert isinstance(got, Raised), f"{where}: stock raised {expected.error!r}, got {got!r}"
        assert isinstance(got.error, type(expected.error)), f"{where}: stock raised {expected.error!r}, got {got.error!r}"
        return
    if isinstance(got, Raised):
        raise AssertionError(f"{where}: stock gave a {type(expected).__name__}, st_npu raised {got.error!r}") from got.error
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: expected a tensor, got {type(got).__name__}"
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), where
        assert_values(expected.cpu().numpy(), got.cpu().numpy(), where)
    elif isinstance(expected, np.ndarray):
        assert type(got) is np.ndarray, f"{where}: expected an ndarray, got {type(got).__name__}"
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), where
        assert_values(expected, got, where)
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), f"{where}: {got!r} != {expected!r}"
        for index, (one, other) in enumerate(zip(expected, got)):
            assert_same(one, other, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert type(got) is type(expected) and list(got) == list(expected), f"{where}: {got!r} != {expected!r}"
        for key in expected:
            assert_same(expected[key], got[key], f"{where}[{key!r}]")
    else:
        assert type(got) is type(expected) and got == expected, f"{where}: {got!r} != {expected!r}"


def assert_values(expected: np.ndarray, got: np.ndarray, where: str) -> None:
    if expected.dtype.kind == "f":
        assert np.abs(got - expected).max(initial=0) <= TOLERANCE, f"{where}: values differ"
    else:  # quantised outputs: a compute difference within 1e-6 may round a rare value into the next bucket
        steps = np.abs(got.astype(np.int64) - expected.astype(np.int64))
        assert steps.max(initial=0) <= 1 and (steps > 0).mean() <= 0.01, f"{where}: values differ"


@contextlib.contextmanager
def logged(level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages sentence-transformers logs at ``level`` or above inside the block."""
    records: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("sentence_transformers")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
