"""A CPU-backed emulated ``npu`` device, so that the NPU code path runs in CI without Ascend hardware.

``install(devices=8)`` renames PyTorch's PrivateUse1 backend to ``npu``, registers a ``torch.npu`` module and a
fake ``torch_npu`` module (``__emulated__ = True``), and runs every operator on an ``npu:N`` tensor by running the
same operator on the CPU data the tensor wraps, so each operator's result is identical to the CPU's. Memory is
counted per device as the bytes of live storages created there; the current device is per thread, as in torch_npu.

What it proves: device plumbing (tensors land on, stay on and move between the right ``npu:N``; mixing devices in
one operator raises, as on a real accelerator), shapes and dtypes, host<->device transfers, how many operators a
workload compiles, memory accounting and out-of-memory handling, and that stock sentence-transformers and
transformers take their NPU branches (``torch_npu`` importable, ``torch.npu.is_available()``).
What it does not prove: anything about Ascend kernels -- which operators exist on the chip, their numerics
(fp16/bf16 accumulation, fused kernels), or speed. Operators dispatch per device type, so a few composites take
another path than on the CPU (scaled_dot_product_attention takes the math path), and whole models agree with the
CPU to ~1e-7 rather than bit for bit. Known gaps, all from PyTorch's Python device guard (it reports one device to
the autograd engine and ignores device switches): backward passes run on ``npu:0`` only; ``set_device`` and
``torch.npu.device`` steer where factory functions put a bare ``"npu"``, but ``Tensor.to("npu")`` always picks
``npu:0``; ``Tensor.new(...)`` lands on the current device, not its tensor's. An npu tensor is never an inference
tensor (its wrapper is made outside inference mode), so an in-place update outside inference mode of one made
inside, which real devices refuse, passes here.

Compilation model: on Ascend the first launch of an operator with a new (operator, input shapes, dtypes)
signature compiles it. The emulator counts one compile per new signature per device (each device has its own
cache) and sleeps ``compile_delay_s`` for it. Operators that launch no AI Core kernel are not counted: views and
other metadata-only operators (those whose schema returns an alias of an input: view, reshape as a view, slice,
select, as_strided, expand, permute, transpose, t, unsqueeze, squeeze, detach, alias, ... plus ``_unsafe_view``),
allocation (``empty``, ``empty_strided``), and copies between two devices (``_to_copy``/``copy_`` host<->device
or npu:i<->npu:j, and ``.item()``). Every operator, counted or not, adds one to ``ops``.

Registering a backend cannot be undone within a process: once installed, ``npu`` stays until the process exits
and its device count is fixed; a later ``install`` may change only the chip, compile delay and memory limit.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

from st_npu.emulator import settings

DEFAULT_TOTAL_MEMORY = 64 * 2**30
# Allocation only reserves memory, and _unsafe_view is a view whose schema does not say so.
_NO_KERNEL_OPS = frozenset({"aten::empty.memory_format", "aten::empty_strided", "aten::_unsafe_view"})
_COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_"})
# Like CUDA, torch_npu accepts CPU index tensors when indexing a device tensor.
_CPU_OPERAND_OPS = frozenset({"aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})


@dataclass
class _Device:
    compiles: int = 0
    ops: int = 0
    launches: int = 0
    replays: int = 0
    sdpa_unfused: int = 0
    allocated: int = 0
    peak: int = 0
    compiled: set[tuple[Any, ...]] = field(default_factory=set)


@dataclass
class _Emulator:
    devices: list[_Device]
    chip: str
    compile_delay_s: float
    memory_limit: int | None
    # id of each live storage created on a device -> (device index, bytes)
    storages: dict[int, tuple[int, int]] = field(default_factory=dict)
    # device index -> the graph capture under way there (see the graphs section)
    captures: dict[int, _Capture] = field(default_factory=dict)
    # id of each live storage a capture took from a graph pool -> (that pool, bytes)
    pool_storages: dict[int, tuple[_GraphPool, int]] = field(default_factory=dict)
    per_thread: threading.local = field(default_factory=threading.local)

    @property
    def current(self) -> int:
        """The current device: per thread, as in torch_npu (a new thread starts on npu:0)."""
        return getattr(self.per_thread, "index", 0)

    @current.setter
    def current(self, index: int) -> None:
        self.per_thread.index = index


# Re-entrant: a storage finalizer (which takes the lock) may run from garbage collection inside a locked section.
_lock = threading.RLock()
_emulator: _Emulator | None = None
_libraries: list[torch.library.Library] = []  # registrations last only while their Library is referenced


class _NpuTensor(torch.Tensor):
    """A tensor whose device is ``npu:N`` and whose data is the CPU tensor ``_cpu``."""

    _cpu: torch.Tensor

    @staticmethod
    def __new__(cls, cpu: torch.Tensor, index: int) -> _NpuTensor:
        # Made outside inference mode: an inference tensor cannot take the version counter a view needs.
        with torch.inference_mode(False):
            tensor = torch.Tensor._make_wrapper_subclass(
                cls, cpu.shape, strides=cpu.stride(), storage_offset=cpu.storage_offset(),
                dtype=cpu.dtype, device=torch.device("npu", index),
            )
        tensor._cpu = cpu
        return tensor

    @property
    def data(self) -> torch.Tensor:
        return super().data

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # nn.Module._apply moves npu parameters (to another npu, or another dtype) by assigning .data, which copies
        # the tensor's metadata but not Python attributes, so the CPU data must follow by hand.
        torch.Tensor.data.__set__(self, new)
        self._cpu = new._cpu

    def new_tensor(self, data: Any, **kwargs: Any) -> torch.Tensor:
        # The C++ method puts the result on the device guard's current device, which a Python backend cannot set.
        if kwargs.get("device") is None:
            kwargs["device"] = self.device
        return super().new_tensor(data, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: torch._ops.OpOverload, _types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        # Print as tensor([...], device='npu:0') like any device tensor, not as _NpuTensor([...]).
        text = super().__repr__(tensor_contents=tensor_contents)
        extra_indent = len(type(self).__name__) - len("tensor")
        return "tensor" + text[len(type(self).__name__):].replace("\n" + " " * extra_indent, "\n")

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Pickle (torch.save) like a real device tensor, from a CPU copy, not as this private class.
        return torch._utils._rebuild_device_tensor_from_cpu_tensor, (
            self.cpu(), self.dtype, str(self.device), self.requires_grad)

    # A torch_npu tensor has a device storage with a real pointer, which savers read (safetensors and transformers
    # tell shared weights apart by storage pointer and size); a wrapper has none. The CPU data's storage stands in:
    # the same pointer identity and byte count, though its device reads cpu where Ascend's reads npu.
    def untyped_storage(self) -> torch.UntypedStorage:
        return self._cpu.untyped_storage()

    def data_ptr(self) -> int:
        return self._cpu.data_ptr()

    def numpy(self, *, force: bool = False) -> Any:
        # What torch says for any device tensor (torch.Tensor would only say subclasses are unsupported).
        if force:
            return self.cpu().numpy()
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                        f"tensor to host memory first.")

    # torch.Tensor refuses tolist() for subclasses and formats only its own 0-dim tensors as numbers; printing
    # a tensor needs both.
    def tolist(self) -> Any:
        return self.cpu().tolist()

    def __format__(self, format_spec: str) -> str:
        return self.item().__format__(format_spec) if self.dim() == 0 else super().__format__(format_spec)

    __torch_function__ = torch._C._disabled_torch_function_impl


def install(devices: int = 8, compile_delay_s: float = 0.0, memory_limit_bytes: int | None = None,
            chip: str = "Ascend910B3") -> None:
    """Register the emulated ``npu`` backend with ``devices`` devices, or update the settings of the installed one."""
    global _emulator
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if compile_delay_s < 0:
        raise ValueError(f"compile_delay_s must not be negative, got {compile_delay_s}")
    _check_limit(memory_limit_bytes)
    physical, devices = devices, settings.visible_device_count(devices)
    with _lock:
        if _emulator is None:
            _refuse_real_torch_npu()
            _setup_privateuseone_for_python_backend(rename="npu", backend_module=_TorchNpu("torch.npu"))
            _libraries.extend((torch.library.Library("_", "IMPL"), torch.library.Library("aten", "IMPL")))
            _libraries[0].fallback(_fallback, dispatch_key="PrivateUse1")
            # torch.tensor(..., device="npu") fills the new tensor by copy_ with the Python key excluded, so the
            # wrapper reaches the PrivateUse1 kernel; PyTorch routes that only to a per-operator registration.
            _libraries[1].impl("copy_", functools.partial(_fallback, torch.ops.aten.copy_.default), "PrivateUse1")
            sys.modules["torch_npu"] = _torch_npu_module()
            _emulator = _Emulator([_Device() for _ in range(devices)], chip, compile_delay_s, memory_limit_bytes)
            _visibility["physical"] = physical
        elif devices != len(_emulator.devices):
            raise RuntimeError(
                f"the npu emulator is already installed with {len(_emulator.devices)} devices and cannot be "
                f"reinstalled with {devices}: a backend registration lasts for the whole process"
            )
        else:
            _emulator.chip, _emulator.compile_delay_s = chip, compile_delay_s
            _emulator.memory_limit = memory_limit_bytes
    _clear_transformers_probes()


def install_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the emulator when ``ST_NPU_EMULATE`` holds a device count; return whether it did.

    ``ST_NPU_EMULATE_CHIP`` picks the chip name and ``ST_NPU_EMULATE_MEMORY_LIMIT`` a per-device limit in bytes.
    An unset or empty ``ST_NPU_EMULATE`` installs nothing.
    """
    if not environ.get("ST_NPU_EMULATE"):
        return False
    limit = environ.get("ST_NPU_EMULATE_MEMORY_LIMIT")
    install(
        devices=settings.env_int(environ, "ST_NPU_EMULATE", minimum=1),
        memory_limit_bytes=settings.env_int(environ, "ST_NPU_EMULATE_MEMORY_LIMIT", minimum=0) if limit else None,
        chip=environ.get("ST_NPU_EMULATE_CHIP") or "Ascend910B3",
    )
    return True


def is_installed() -> bool:
    """Whether ``install`` has run in this process (it cannot be undone)."""
    return _emulator is not None


def set_memory_limit(limit_bytes: int | None) -> None:
    """Cap each device's live tensor bytes (``None`` removes the cap); allocations beyond it raise NPU OOM."""
    _check_limit(limit_bytes)
    with _lock:
        _require().memory_limit = limit_bytes


def stats() -> dict[str, Any]:
    """Counts since install or ``reset_stats``, in total and per device, plus memory.

    ``ops``: operators dispatched; ``launches``: those that put work on the device (kernels and transfers; a graph
    replay is one); ``replays``: graph replays; ``sdpa_unfused``: SDPA calls that miss the fused kernel.
    """
    with _lock:
        per_device = {
            index: {"compiles": d.compiles, "ops": d.ops, "launches": d.launches, "replays": d.replays,
                    "sdpa_unfused": d.sdpa_unfused, "memory_allocated": d.allocated, "max_memory_allocated": d.peak}
            for index, d in enumerate(_require().devices)
        }
    totals = {key: sum(d[key] for d in per_device.values())
              for key in ("compiles", "ops", "launches", "replays", "sdpa_unfused")}
    return {**totals, "per_device": per_device}


def reset_stats() -> None:
    """Zero the compile and operator counts; the compile caches stay, as a device keeps its compiled operators."""
    with _lock:
        for d in _require().devices:
            d.compiles = d.ops = d.launches = d.replays = d.sdpa_unfused = 0


# --- torch.npu and torch_npu -------------------------------------------------------------------------------------

_DeviceLike = int | str | torch.device


class _TorchNpu(types.ModuleType):
    """The ``torch.npu`` module: the part of torch_npu's surface that sentence-transformers, transformers and st_npu
    call. ``None`` for a device means the current one."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed(seed: int) -> None:
        """Nothing to seed: npu operators draw from the CPU generator, which ``torch.manual_seed`` seeds."""

    manual_seed_all = manual_seed

    @staticmethod
    def device_count() -> int:
        return len(_require().devices)

    @staticmethod
    def current_device() -> int:
        return _require().current

    @staticmethod
    def set_device(device: _DeviceLike) -> None:
        index = _index(device)
        with _lock:
            _require().current = index

    @staticmethod
    def synchronize(device: _DeviceLike | None = None) -> None:
        """Operators run synchronously on the CPU, so there is never anything to wait for."""
        _index(device)

    @staticmethod
    def empty_cache() -> None:
        """The emulator keeps no cache of freed memory."""

    @staticmethod
    def get_device_name(device: _DeviceLike | None = None) -> str:
        _index(device)
        return f"{_require().chip} (emulated)"

    @staticmethod
    def is_bf16_supported() -> bool:
        # The 910A (first generation) and the 310 inference chips have no bf16 units.
        return not _require().chip.startswith(("Ascend910A", "Ascend310"))

    @staticmethod
    def memory_allocated(device: _DeviceLike | None = None) -> int:
        with _lock:
            return _require().devices[_index(device)].allocated

    @staticmethod
    def max_memory_allocated(device: _DeviceLike | None = None) -> int:
        with _lock:
            return _require().devices[_index(device)].peak

    @staticmethod
    def reset_peak_memory_stats(device: _DeviceLike | None = None) -> None:
        with _lock:
            d = _require().devices[_index(device)]
            d.peak = d.allocated

    @staticmethod
    def mem_get_info(device: _DeviceLike | None = None) -> tuple[int, int]:
        """(free, total) bytes; total is the memory limit, or 64 GiB without one."""
        with _lock:
            total = _total_memory()
            return max(total - _require().devices[_index(device)].allocated, 0), total

    class device:
        """Context manager that makes ``device`` the current npu for its body."""

        def __init__(self, device: _DeviceLike) -> None:
            self.index = _index(device)

        def __enter__(self) -> None:
            self.previous = _TorchNpu.current_device()
            _TorchNpu.set_device(self.index)

        def __exit__(self, *exc: object) -> None:
            _TorchNpu.set_device(self.previous)


def _torch_npu_module() -> types.ModuleType:
    module = types.ModuleType("torch_npu", "Stand-in for torch_npu, installed by st_npu.emulator.backend.")
    module.__emulated__ = True
    module.__version__ = "emulated"
    # importlib.util.find_spec (and through it transformers) reads an imported module's __spec__.
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None, origin=__name__)
    module.npu = torch.npu  # real torch_npu exposes the device module as torch_npu.npu too
    module.npu_fusion_attention = _npu_fusion_attention
    return module


def _npu_fusion_attention(*args: Any, **kwargs: Any) -> Any:
    # transformers imports this from any torch_npu it finds, so it must exist; being an Ascend kernel, it cannot run.
    raise NotImplementedError(
        "torch_npu.npu_fusion_attention is an Ascend kernel that the npu emulator does not provide; "
        "load the model with attn_implementation='sdpa' or 'eager'"
    )


# --- dispatch ----------------------------------------------------------------------------------------------------


def _fallback(func: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    # Reached by operators with no npu tensor argument, e.g. torch.empty(..., device="npu:2").
    return _run(func, args, kwargs)


def _run(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> Any:
    # Under inference mode composite operators (e.g. to) skip autograd and arrive here whole: break them down as
    # autograd would have, or running them on the CPU data could alias where the caller expects a copy.
    _note_sdpa(func.name(), args, kwargs)
    decomposed = func.decompose(*args, **kwargs)
    if decomposed is not NotImplemented:
        return decomposed
    name = func.name()
    tensors = [x for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]
    npu_indices = [t.device.index for t in tensors if isinstance(t, _NpuTensor)]
    target = kwargs.get("device")  # factory operators and _to_copy say where their result goes
    if target is None:
        out_index = npu_indices[0] if npu_indices else None
    else:
        out_index = _index(target) if target.type == "npu" else None
        target = torch.device("npu", out_index) if target.type == "npu" else target
    if name not in _COPY_OPS:
        _check_same_device(name, tensors)
    devices = {t.device for t in tensors} | ({target} if target is not None else set())
    transfer = name == "aten::_local_scalar_dense" or (name in _COPY_OPS and len(devices) > 1)
    kernel = not (transfer or name in _NO_KERNEL_OPS or _is_view(func))
    index = npu_indices[0] if npu_indices else out_index
    capture = _capture_on(index)
    if capture is not None and (transfer or name in _DATA_DEPENDENT_OPS):
        capture.failed = name
        raise RuntimeError(_CAPTURE_ERROR)
    _record(index, name, tensors, kernel, capturing=capture is not None)

    def to_cpu(x: Any) -> Any:
        if isinstance(x, _NpuTensor):
            return x._cpu
        if isinstance(x, torch.device) and x.type == "npu":
            return torch.device("cpu")
        return x

    result = func(*pytree.tree_map(to_cpu, args), **pytree.tree_map(to_cpu, kwargs))
    # In-place and out= operators return their argument; hand back the caller's tensor, not a new wrapper.
    inputs = {id(to_cpu(t)): t for t in tensors}

    def to_npu(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in inputs:
            original = inputs[id(x)]
            if isinstance(original, _NpuTensor):
                _sync_metadata(original)
                _account(original._cpu, original.device.index)
            return original
        if out_index is None:
            return x
        _account(x, out_index)
        return _NpuTensor(x, out_index)

    output = pytree.tree_map(to_npu, result)
    if capture is not None:
        capture.record(func, args, kwargs, output, to_cpu)
    return output


@functools.cache
def _is_view(func: torch._ops.OpOverload) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _check_same_device(name: str, tensors: list[torch.Tensor]) -> None:
    # CPU scalars (0-dim) mix with device tensors, as on CUDA; anything else on another device is a plumbing bug.
    on = {t.device for t in tensors
          if isinstance(t, _NpuTensor) or (t.dim() > 0 and name not in _CPU_OPERAND_OPS)}
    if len(on) > 1 and any(d.type == "npu" for d in on):
        first, second = sorted(on, key=str)[:2]
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}! "
            f"(operator {name})"
        )


def _sync_metadata(tensor: _NpuTensor) -> None:
    # resize_, set_ and out= operators may reshape their CPU data in place; the wrapper must show the new shape.
    cpu = tensor._cpu
    if (cpu.shape, cpu.stride(), cpu.storage_offset()) != (tensor.shape, tensor.stride(), tensor.storage_offset()):
        torch.Tensor.data.__set__(tensor, _NpuTensor(cpu, tensor.device.index))


def _record(index: int, name: str, tensors: list[torch.Tensor], kernel: bool, capturing: bool = False) -> None:
    signature = (name, tuple((tuple(t.shape), t.dtype) for t in tensors))
    with _lock:
        emulator = _require()
        d = emulator.devices[index]
        d.ops += 1
        d.launches += (kernel or name in _COPY_OPS or name == "aten::_local_scalar_dense") and not capturing
        compiles = kernel and signature not in d.compiled
        if compiles:
            d.compiled.add(signature)
            d.compiles += 1
        delay = emulator.compile_delay_s
    if compiles and delay:
        time.sleep(delay)


# --- memory ------------------------------------------------------------------------------------------------------


def _account(cpu: torch.Tensor, index: int) -> None:
    """Charge ``cpu``'s storage to device ``index`` the first time it is seen there (and when it grows)."""
    storage = cpu.untyped_storage()
    key, nbytes = id(storage), storage.nbytes()
    with _lock:
        emulator = _require()
        d = emulator.devices[index]
        known = emulator.storages.get(key)
        capture = _capture_on(index)
        if capture is not None and known is None:  # served by the graph's private pool
            if key not in capture.storages:  # (views of a pool tensor come back here with its storage)
                capture.storages[key] = nbytes
                capture.pool.allocate(nbytes, d)
                emulator.pool_storages[key] = (capture.pool, nbytes)
                weakref.finalize(storage, _release, key)
            return
        growth = nbytes - (known[1] if known else 0)
        total = _total_memory()
        if growth > 0 and d.allocated + growth > total:
            raise RuntimeError(
                f"NPU out of memory. Tried to allocate {_format_bytes(growth)} (NPU {index}; "
                f"{_format_bytes(total)} total capacity; {_format_bytes(d.allocated)} already allocated; "
                f"{_format_bytes(max(total - d.allocated, 0))} free; limit set by st_npu.emulator.backend)"
            )
        if known is None:
            weakref.finalize(storage, _release, key)
        emulator.storages[key] = (index, nbytes)
        d.allocated += growth
        d.peak = max(d.peak, d.allocated)


def _release(key: int) -> None:
    with _lock:
        emulator = _require()
        if key in emulator.pool_storages:  # pool memory: free for the pool's next captures, kept by the pool
            pool, nbytes = emulator.pool_storages.pop(key)
            pool.live -= nbytes
            for capture in emulator.captures.values():
                capture.storages.pop(key, None)
            return
        index, nbytes = emulator.storages.pop(key)
        emulator.devices[index].allocated -= nbytes


def _total_memory() -> int:
    limit = _require().memory_limit
    return DEFAULT_TOTAL_MEMORY if limit is None else limit


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# --- ASCEND_RT_VISIBLE_DEVICES ---------------------------------------------------------------------------------
# The Ascend runtime shows a process only the devices listed in ASCEND_RT_VISIBLE_DEVICES, renumbered from 0 in the
# listed order: with "2,3", npu:0 is device 2 and npu:1 device 3. Ray sets it for each task or actor holding an "NPU"
# resource, so inside an actor the NPU is npu:0. ``install(devices=n)`` describes the machine (n devices) and the
# variable, read once at install as the runtime reads it once at start-up, picks the visible ones. Where the
# runtime's answer is not documented, the emulator chooses the strict one: an index that is not an integer, out of
# range or repeated raises; an empty or unset variable shows every device.

_visibility: dict[str, int] = {}


def physical_device_count() -> int:
    """The emulated machine's device count, before ASCEND_RT_VISIBLE_DEVICES: what a spawned worker installs."""
    _require()
    return _visibility["physical"]


# --- graphs: torch.npu.NPUGraph ------------------------------------------------------------------------------
#
# Mirrors torch_npu/npu/graphs.py (torch.npu.NPUGraph, torch.npu.graph, graph_pool_handle,
# is_current_stream_capturing), which has CUDA graphs' shape. Capture on the current device records each operator
# launch of the capturing thread (other threads' work goes to their own streams and runs as usual) and computes
# nothing the caller may rely on: when capture ends, every tensor it produced holds garbage
# (NaN, or -1 for integers) until the first replay, as on hardware. A replay re-runs the recorded launches on the
# captured buffers and counts as one launch. During capture, a host<->device copy, ``.item()`` or an operator whose
# output shape depends on data (nonzero, masked_select, unique, ...) raises; the wording is CUDA's (PyTorch's
# ``cudaErrorStreamCaptureUnsupported``), as torch_npu's ACL runtime text could not be checked here. Memory
# allocated during capture comes from the graph's private pool (see _GraphPool): graphs sharing a pool (``pool=``)
# share the memory a capture freed, not what an earlier graph's outputs still hold; replays allocate nothing.
# Not emulated: ``make_graphed_callables``, ``update``, capture on side streams, the errors "global"
# capture_error_mode raises for other threads' unsafe calls (every mode behaves as "thread_local"), and which
# operators the chip could not capture (only aclnn ones can).

_DATA_DEPENDENT_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
    "aten::_unique2", "aten::unique_dim", "aten::_unique", "aten::bincount", "aten::repeat_interleave.Tensor",
})
_CAPTURE_ERROR = "NPU error: operation not permitted when stream is capturing"
_SDPA_OPS = frozenset({"aten::scaled_dot_product_attention", "aten::_fused_sdp_choice"})


class _Slot:
    """A tensor produced during capture: replays compute it again (see _Capture.record)."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number


class _GraphPool:
    """A private memory pool (``graph_pool_handle()``), as the caching allocator keeps one: what a capture frees
    serves later captures, what stays referenced (a graph's outputs) stays taken, and the pool holds the most it
    ever had taken at once until it is gone."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.reserved = [0]  # a box, read by the finalizer after the pool itself is gone
        self.live = 0  # bytes of its storages still referenced, whichever capture made them

    def allocate(self, nbytes: int, device: _Device) -> None:
        self.live += nbytes
        growth = self.live - self.reserved[0]
        if growth > 0:
            if device.allocated + growth > _total_memory():
                raise RuntimeError(f"NPU out of memory. Tried to allocate {_format_bytes(growth)} (NPU {self.index}; "
                                   f"graph capture; limit set by st_npu.emulator.backend)")
            self.reserved[0] += growth
            device.allocated += growth
            device.peak = max(device.peak, device.allocated)

    def bind(self, index: int) -> None:
        if self.index is None:
            self.index = index
            weakref.finalize(self, _release_pool, index, self.reserved)
        elif self.index != index:
            raise RuntimeError(f"a graph pool of npu:{self.index} cannot serve a capture on npu:{index}")


def _release_pool(index: int, reserved: list[int]) -> None:
    with _lock:
        if _emulator is not None:
            _emulator.devices[index].allocated -= reserved[0]


class _Capture:
    """One capture under way on one device: its recorded launches and its pool use."""

    def __init__(self, graph: NPUGraph, pool: _GraphPool, index: int) -> None:
        self.graph, self.pool, self.index = graph, pool, index
        self.thread = threading.get_ident()
        self.launches: list[tuple[Any, ...]] = []
        self.slots: dict[int, tuple[int, weakref.ref]] = {}  # id of a CPU tensor made here -> (slot, the tensor)
        self.storages: dict[int, int] = {}  # live pool storages made by this capture -> bytes
        self.counter = -1
        self.failed: str | None = None

    def record(self, func: Any, args: tuple, kwargs: dict, output: Any, to_cpu: Any) -> None:
        inputs = [to_cpu(x) for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]

        def template(x: Any) -> Any:
            x = to_cpu(x)
            if isinstance(x, torch.Tensor):
                known = self.slots.get(id(x))
                if known is not None and known[1]() is x:
                    return _Slot(known[0])
            return x  # made before capture (weights, static inputs): replays read its current data

        outputs = []
        for leaf in pytree.tree_leaves(output):
            cpu = to_cpu(leaf) if isinstance(leaf, torch.Tensor) else None
            if cpu is None or any(cpu is x for x in inputs):  # in-place: the input already stands for it
                outputs.append(None)
                continue
            number = self.counter = self.counter + 1
            self.slots[id(cpu)] = (number, weakref.ref(cpu))
            outputs.append((number, weakref.ref(cpu)))
        self.launches.append((func, pytree.tree_map(template, args), pytree.tree_map(template, kwargs), outputs))

    def garbage(self) -> None:
        """What capture computed is not there on hardware: overwrite every buffer made from pool memory."""
        for _, tensor_ref in self.slots.values():
            tensor = tensor_ref()
            if tensor is not None and id(tensor.untyped_storage()) in self.storages:
                tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def _capture_on(index: int | None) -> _Capture | None:
    """The capture recording this thread's work on npu:``index``: another thread's work goes to its own stream."""
    capture = None if index is None or _emulator is None else _emulator.captures.get(index)
    return capture if capture is not None and capture.thread == threading.get_ident() else None


def _note_sdpa(name: str, args: tuple, kwargs: dict) -> None:
    """Count SDPA calls torch_npu would not send to npu_fusion_attention: a non-bool mask, non-4-D inputs, or a chip
    before the 910B (op-plugin's ScaledDotProductAttention kernel)."""
    if name not in _SDPA_OPS or not isinstance(args[0], _NpuTensor):
        return
    query, index = args[0], args[0].device.index
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    fused = (query.dim() == 4 and (mask is None or mask.dtype == torch.bool)
             and not _require().chip.startswith(("Ascend910A", "Ascend310")))
    if not fused:
        with _lock:
            _require().devices[index].sdpa_unfused += 1


class NPUGraph:
    """``torch.npu.NPUGraph``: capture_begin/capture_end/replay/reset/pool on the emulated npu."""

    def __init__(self) -> None:
        self._launches: list[tuple[Any, ...]] | None = None
        self._done_after: list[list[int]] = []  # per launch: the values no later launch reads
        self._pool: _GraphPool | None = None
        self._index: int | None = None

    def capture_begin(self, pool: _GraphPool | None = None, capture_error_mode: str = "global") -> None:
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"unknown capture_error_mode {capture_error_mode!r}")
        if self._launches is not None:
            raise RuntimeError("This NPUGraph instance already owns a captured graph; call reset() first")
        index = _require().current
        pool = pool if pool is not None else _GraphPool()
        with _lock:
            if index in _emulator.captures:
                raise RuntimeError(f"npu:{index} is already capturing a graph")
            pool.bind(index)
            self._pool, self._index = pool, index
            _emulator.captures[index] = _Capture(self, pool, index)

    def capture_end(self) -> None:
        with _lock:
            capture = _emulator.captures.pop(self._index, None)
        if capture is None:
            raise RuntimeError("capture_end() without capture_begin()")
        if capture.failed:
            raise RuntimeError(f"NPU error: operation failed due to a previous error during capture "
                               f"({capture.failed})")
        capture.garbage()
        self._launches = capture.launches
        self._done_after = _last_reads(capture.launches)

    def replay(self) -> None:
        if self._launches is None:
            raise RuntimeError("replay() needs a captured graph: call capture_begin()/capture_end() first")
        values: dict[int, torch.Tensor] = {}

        def fill(x: Any) -> Any:
            return values[x.number] if isinstance(x, _Slot) else x

        with torch.inference_mode():
            for position, (func, args, kwargs, outputs) in enumerate(self._launches):
                result = func(*pytree.tree_map(fill, args), **pytree.tree_map(fill, kwargs))
                for leaf, out in zip(pytree.tree_leaves(result), outputs):
                    if out is None:
                        continue
                    values[out[0]] = leaf
                    captured = out[1]()
                    if captured is not None and captured is not leaf and captured.data_ptr() != leaf.data_ptr():
                        captured.copy_(leaf)  # a buffer someone holds (the graph's outputs) gets the new data
                for number in self._done_after[position]:  # host memory: BERT-base's activations would not fit
                    values.pop(number, None)
        with _lock:
            d = _require().devices[self._index]
            d.launches += 1
            d.replays += 1

    def reset(self) -> None:
        self._launches = None
        self._done_after = []
        self._pool = None

    def pool(self) -> _GraphPool:
        if self._pool is None:
            raise RuntimeError("pool() needs a captured graph")
        return self._pool


def _last_reads(launches: list[tuple[Any, ...]]) -> list[list[int]]:
    """For each launch, the slots no later launch reads: a replay can drop them once it has run."""
    last: dict[int, int] = {}
    for position, (_, args, kwargs, outputs) in enumerate(launches):
        for out in outputs:
            if out is not None:
                last[out[0]] = position
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, _Slot):
                last[leaf.number] = position
    done_after: list[list[int]] = [[] for _ in launches]
    for number, position in last.items():
        done_after[position].append(number)
    return done_after


class _GraphContext:
    """``torch.npu.graph(npu_graph, pool=None, stream=None, capture_error_mode="global")``."""

    def __init__(self, npu_graph: NPUGraph, pool: _GraphPool | None = None, stream: Any = None,
                 capture_error_mode: str = "global") -> None:
        self.graph, self.pool, self.mode = npu_graph, pool, capture_error_mode

    def __enter__(self) -> None:
        _TorchNpu.synchronize()
        self.graph.capture_begin(pool=self.pool, capture_error_mode=self.mode)

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.graph.capture_end()
            return
        with _lock:  # the capture is abandoned; the original error is the one worth seeing
            _emulator.captures.pop(self.graph._index, None)
        self.graph.reset()


def _graph_pool_handle() -> _GraphPool:
    return _GraphPool()


def _is_current_stream_capturing() -> bool:
    return _emulator is not None and _capture_on(_emulator.current) is not None


_TorchNpu.NPUGraph = NPUGraph
_TorchNpu.graph = _GraphContext
_TorchNpu.graph_pool_handle = staticmethod(_graph_pool_handle)
_TorchNpu.is_current_stream_capturing = staticmethod(_is_current_stream_capturing)


# --- helpers -----------------------------------------------------------------------------------------------------


def _require() -> _Emulator:
    if _emulator is None:
        raise RuntimeError("the npu emulator is not installed: call st_npu.emulator.backend.install() first")
    return _emulator


def _index(device: _DeviceLike | None) -> int:
    """The device index ``device`` names; ``None`` or a bare ``"npu"`` mean the current device."""
    emulator = _require()
    if device is None:
        index = emulator.current
    elif isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        if device.type != "npu":
            raise ValueError(f"expected an npu device, got {device}")
        index = emulator.current if device.index is None else device.index
    count = len(emulator.devices)
    if not 0 <= index < count:
        raise RuntimeError(
            f"npu:{index} does not exist: the npu emulator has {count} devices (npu:0 to npu:{count - 1})")
    return index


def _check_limit(limit_bytes: int | None) -> None:
    if limit_bytes is not None and limit_bytes < 0:
        raise ValueError(f"memory limit must be a byte count >= 0 or None, got {limit_bytes}")


def _refuse_real_torch_npu() -> None:
    loaded = sys.modules.get("torch_npu")
    if loaded is not None and not getattr(loaded, "__emulated__", False):
        raise RuntimeError("torch_npu is loaded: refusing to emulate an npu over a real Ascend backend")
    if loaded is None and importlib.util.find_spec("torch_npu") is not None:
        raise RuntimeError("torch_npu is installed: refusing to emulate an npu where a real Ascend backend exists")


def _clear_transformers_probes() -> None:
    # transformers caches these answers; clear them so they see the emulated NPU and its current chip. If
    # transformers is not imported yet its caches are still empty.
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in ("is_torch_npu_available", "is_torch_bf16_gpu_available"):
        cache_clear = getattr(getattr(import_utils, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
