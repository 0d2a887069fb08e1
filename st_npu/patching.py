"""``st_npu.patch()``: unchanged code that builds stock sentence-transformers models runs on NPUs.

Frameworks build their own stock ``SentenceTransformer`` and scripts call ``SentenceTransformer(name)`` with no
device. Stock then answers a bare ``"npu"`` that ignores ``LOCAL_RANK`` and fails unless torch_npu was imported
first; torch_npu's ``transfer_to_npu`` rewrites torch for the whole process and cannot be undone. ``patch()``
changes two attributes of each model class, keeps each original, and ``undo()``/``unpatch()`` put them back.

What the patch changes (``PatchHandle.changes``), and how each is restored, for ``SentenceTransformer``,
``CrossEncoder``, ``SparseEncoder`` and (6.3+) ``MultiVectorEncoder`` alike:

- ``__init__`` is wrapped (undo sets the original function back). With no device and no ``device_map`` it picks
  ``npu:{LOCAL_RANK or 0}`` when an NPU is usable; ``"npu"``, ``"npu:N"`` and ``torch.device("npu", N)`` are resolved
  by st_npu, which loads torch_npu and checks the index. After stock's constructor it casts to the patch's dtype,
  gives a known model its instruction prompts (llm-embedder's tasks; the model's own prompts win) and hands the model
  to the engine (:func:`st_npu.engine.accelerate`, instance attributes on that model only), exactly as
  ``st_npu.SentenceTransformer`` does; models on other devices get the engine's CPU defaults. st_npu's own classes
  are left to their own constructors, which do all of this already.
- ``start_multi_process_pool`` is set on the class (stock inherits it from a base class, so undo deletes it again):
  see ``start_pool``. ``encode(texts, device=[...])`` goes through it too.

Nothing else: no torch globals, no module-level functions, nothing in torch_npu. ``patch()`` is also a context
manager, and ``st-npu run script.py`` runs a script with it active (:mod:`st_npu.commands.run`).
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from st_npu import _compat
from st_npu.engine import Options, accelerate
from st_npu.loading.folder import recognise_model
from st_npu.loading.pipeline import instruction_prompts
from st_npu.runtime.devices import check_dtype_supported, names_npu, npu_count, resolve_device, resolve_dtype
from st_npu.runtime.pools import start_pool

PUBLIC_PACKAGE = "sentence_transformers"
_MISSING = object()  # an owner that only inherited the attribute: undo deletes the replacement

_lock = threading.RLock()
_active: PatchHandle | None = None


@dataclass(frozen=True)
class PatchOptions:
    """What ``patch()`` applies to each stock model it sees built."""

    static_shapes: bool | None = None  # None: on when the model lands on an NPU
    warmup: bool = False
    dtype: torch.dtype | None = None
    graphs: bool | None = None  # None: on where static shapes are on and the device can capture


@dataclass(frozen=True)
class Change:
    """One attribute the patch replaced: undoing it is ``setattr(owner, attribute, original)`` (or delattr)."""

    owner: Any
    attribute: str
    original: Any

    @property
    def label(self) -> str:
        return f"{PUBLIC_PACKAGE}.{self.owner.__qualname__}.{self.attribute}"

    def restore(self) -> None:
        if self.original is _MISSING:
            delattr(self.owner, self.attribute)
        else:
            setattr(self.owner, self.attribute, self.original)


class PatchHandle:
    """The result of ``patch()``: ``undo()`` it, or use it as a context manager.

    A ``patch()`` made while another is active changes nothing and returns a handle with no changes, whose
    ``undo()`` does nothing: an inner ``with st_npu.patch():`` never removes the outer one.
    """

    def __init__(self, options: PatchOptions, changes: list[Change]) -> None:
        self.options = options
        self._changes = changes

    @property
    def changes(self) -> list[str]:
        """What this handle replaced, e.g. ``"sentence_transformers.SentenceTransformer.__init__"``."""
        return [change.label for change in self._changes]

    @property
    def active(self) -> bool:
        """Whether this handle's changes are in force now (never true for a handle that changed nothing)."""
        return _active is self

    def undo(self) -> None:
        """Restore every replaced attribute to its original object; a no-op once undone or for a no-op handle."""
        global _active
        with _lock:
            if _active is not self:
                return
            for change in reversed(self._changes):
                change.restore()
            _active = None

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<PatchHandle active={self.active} changes={self.changes}>"


def patch(
    static_shapes: bool | None = None, warmup: bool = False, dtype: str | torch.dtype | None = None,
    graphs: bool | None = None,
) -> PatchHandle:
    """Make every stock ``SentenceTransformer``, ``CrossEncoder``, ``SparseEncoder`` and ``MultiVectorEncoder`` built
    from now on NPU-aware, until ``undo()``/``unpatch()``.

    Args:
        static_shapes: pad batches to a few fixed shapes (``st_npu.engine.static_shapes``); ``None`` turns them on for
            models that land on an NPU. Skipped where that module does not exist.
        warmup: compile every static shape right after each model is built.
        dtype: cast each model to float32, float16 or bfloat16 after loading; ``None`` keeps the checkpoint's.
        graphs: replay each static shape as a captured device graph (``st_npu.engine.graphs``), captured by the warm-up;
            ``None`` turns it on where static shapes are on and the device can capture.

    Returns the handle of the new patch. While a patch is active, ``patch()`` changes nothing and returns a
    handle with no changes whose ``undo()`` does nothing (warning if its options differ from the active ones).
    """
    if warmup and static_shapes is False:
        raise ValueError("warmup=True needs static shapes: without them every new batch shape compiles anyway.")
    options = PatchOptions(static_shapes, warmup, resolve_dtype(dtype), graphs)
    global _active
    with _lock:
        if _active is not None:
            if options != _active.options:
                warnings.warn(f"st_npu.patch() is already active with {_active.options}; this call changes nothing "
                              f"(unpatch() first to change the options).", RuntimeWarning, stacklevel=2)
            return PatchHandle(options, [])
        changes = []
        for model_class in _compat.model_classes():
            changes += [_replace(model_class, "__init__", _patched_init(model_class.__init__, options)),
                        _replace(model_class, "start_multi_process_pool",
                                 _patched_start(model_class.start_multi_process_pool))]
        _active = PatchHandle(options, changes)
        return _active


def unpatch() -> bool:
    """Undo the active patch, whichever handle made it; returns whether one was active."""
    with _lock:
        if _active is None:
            return False
        _active.undo()
        return True


def _replace(owner: Any, attribute: str, replacement: Any) -> Change:
    change = Change(owner, attribute, vars(owner).get(attribute, _MISSING))
    setattr(owner, attribute, replacement)
    return change


# --- construction --------------------------------------------------------------------------------------------


def _patched_init(original: Callable[..., None], options: PatchOptions) -> Callable[..., None]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _built_by_st_npu(self):
            original(self, *args, **kwargs)
            return
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a bad call: let stock say what is wrong with it
            original(self, *args, **kwargs)
            return
        device = _npu_for(bound.arguments)
        if device is not None:
            check_dtype_supported(device, options.dtype)  # before any weights are read
            bound.arguments["device"] = str(device)
        original(*bound.args, **bound.kwargs)
        _finish(self, options)

    return __init__


def _built_by_st_npu(model: Any) -> bool:
    # Resolved at call time: st_npu's classes may import this module.
    from st_npu.cross_encoder import CrossEncoder
    from st_npu.model import SentenceTransformer

    return isinstance(model, (SentenceTransformer, CrossEncoder))


def _npu_for(arguments: dict[str, Any]) -> torch.device | None:
    """The NPU that stock constructor ``arguments`` should get, or ``None`` to leave the device to stock."""
    device = arguments.get("device")
    if device is not None:
        return resolve_device(device) if names_npu(device) else None
    if (arguments.get("model_kwargs") or {}).get("device_map") is not None:
        return None  # accelerate places this model
    if arguments.get("backend", "torch") != "torch":
        return None  # ONNX/OpenVINO pick their own execution provider
    return resolve_device(None) if npu_count() else None  # without an NPU, stock's own choice stands


def _finish(model: Any, options: PatchOptions) -> None:
    if options.dtype is not None:
        model.to(options.dtype)
    spec = recognise_model(model)
    for name, prompt in instruction_prompts(spec).items():
        model.prompts.setdefault(name, prompt)
    engine = accelerate(model, Options(options.static_shapes, options.graphs, spec=spec))
    if options.warmup and engine is not None and engine.policy is not None:
        engine.warmup()


# --- multi-process pools -------------------------------------------------------------------------------------


def _patched_start(original: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(original)
    def start_multi_process_pool(self: Any, target_devices: list[str] | None = None) -> dict[str, Any]:
        return start_pool(target_devices, functools.partial(original, self))

    return start_multi_process_pool
