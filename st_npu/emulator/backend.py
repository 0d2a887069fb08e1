"""A CPU-backed emulated ``npu`` device, so that the NPU code path runs in CI without Ascend hardware.

``install(devices=8)`` renames PyTorch's PrivateUse1 backend to ``npu``, registers a ``torch.npu`` module and a
fake ``torch_npu`` module (``__emulated__ = True``), and runs every operator on an ``npu:N`` tensor by running the
same CPU kernel on the host memory behind it, so each operator's result is identical to the CPU's. An npu tensor is
a plain ``torch.Tensor``, as torch_npu's are: its storage is on ``npu:N`` and has a real pointer (into host memory),
and a tensor made in inference mode is an inference tensor. Memory is counted per device as the bytes of live
storages created there; the current device is per thread, as in torch_npu.

What it proves: device plumbing (tensors land on, stay on and move between the right ``npu:N``; mixing devices in
one operator raises, as on a real accelerator), shapes and dtypes, host<->device transfers, how many operators a
workload compiles, memory accounting and out-of-memory handling, and that stock sentence-transformers and
transformers take their NPU branches (``torch_npu`` importable, ``torch.npu.is_available()``).
What it does not prove: anything about Ascend kernels -- which operators exist on the chip, their numerics
(fp16/bf16 accumulation, fused kernels), or speed. In inference mode SDPA reaches the device whole and counts as one
launch where torch_npu would send it to its fused kernel, and as its math steps elsewhere (``sdpa_unfused``).
Sparse COO tensors live on the device, as torch_npu keeps them (see the sparse section; other sparse layouts are not
emulated), and LSTM runs whole in inference, as torch_npu's own kernel; a packed sequence's lengths and batch sizes
stay on the host, where torch requires them.
Known gaps, all from PyTorch's Python device guard (it reports npu:0 to the C++ side and ignores device switches):
backward passes run on ``npu:0`` only; ``set_device`` and ``torch.npu.device`` steer where factory functions put a
bare ``"npu"``, but ``Tensor.to("npu")`` always picks ``npu:0``; ``Tensor.new(...)`` lands on the current device,
not its tensor's. Python cannot register a device allocator either, so a few torch entry points are adapted at
install, for every tensor of the process: ``Tensor.new_tensor`` names its npu tensor's device, ``UntypedStorage(...,
device="npu:N")`` (deepcopy, torch.load) allocates on the host and moves there, and ``ForkingPickler`` (a
torch.multiprocessing queue) sends an npu tensor through shared host memory to the same ``npu:N``.

Compilation model: on Ascend the first launch of an operator with a new (operator, input shapes, dtypes)
signature compiles it. The emulator counts one compile per new signature per device (each device has its own
cache) and sleeps ``compile_delay_s`` for it. Operators that launch no AI Core kernel are not counted: views and
other metadata-only operators (those whose schema returns an alias of an input: view, reshape as a view, slice,
select, as_strided, expand, permute, transpose, t, unsqueeze, squeeze, detach, alias, ... plus ``_unsafe_view``),
allocation (``empty``, ``empty_strided``), ``set_``, and copies between two devices (``_to_copy``/``copy_``
host<->device or npu:i<->npu:j, and ``.item()``). Every operator, counted or not, adds one to ``ops``.

Registering a backend cannot be undone within a process: once installed, ``npu`` stays until the process exits
and its device count is fixed; a later ``install`` may change only the chip, compile delay and memory limit.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.util
import math
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
from torch.multiprocessing import reductions
from torch.utils import _pytree as pytree
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

from st_npu.emulator import settings

DEFAULT_TOTAL_MEMORY = 64 * 2**30
# Allocation only reserves memory, and _unsafe_view is a view whose schema does not say so.
_NO_KERNEL_OPS = frozenset({"aten::empty.memory_format", "aten::empty_strided", "aten::_unsafe_view"})
_COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_"})
# Operators that point a tensor at other memory: metadata only.
_SET_OPS = frozenset({"aten::set_.source_Storage", "aten::set_.source_Storage_storage_offset",
                      "aten::set_.source_Tensor", "aten::set_.source_Tensor_storage_offset"})
# Like CUDA, torch_npu accepts CPU index tensors when indexing a device tensor.
_CPU_OPERAND_OPS = frozenset({"aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
# Operands that torch itself keeps on the CPU whatever the device: a packed sequence's lengths and batch sizes
# (torch.nn.utils.rnn requires them there, and the RNN kernels read them on the host).
_HOST_ARGUMENTS = {"aten::_pack_padded_sequence": "lengths", "aten::_pad_packed_sequence": "batch_sizes",
                   "aten::lstm.data": "batch_sizes", "aten::gru.data": "batch_sizes",
                   "aten::rnn_tanh.data": "batch_sizes", "aten::rnn_relu.data": "batch_sizes"}
_RNN_OPERATORS = ("lstm.input", "lstm.data")
# Results torch makes on the host from a device input, by position: a packed sequence's batch sizes and the lengths
# unpacking gives back.
_HOST_RESULTS = {"aten::_pack_padded_sequence": 1, "aten::_pad_packed_sequence": 1}


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


# --- npu tensors ---------------------------------------------------------------------------------------------
# An npu tensor is a plain torch.Tensor, as torch_npu's are: its storage's device is npu:N and its memory is host
# memory that a CPU tensor owns. PyTorch lets Python register no allocator for PrivateUse1, but it imports DLPack
# tensors of device type kDLExtDev as PrivateUse1 tensors, keeping the exporter alive until the storage dies; so a
# CPU tensor exported to DLPack, with its device rewritten to (kDLExtDev, N), comes back as an npu:N tensor that
# owns it. Operators run on CPU tensors that alias the npu tensors' memory (see _host).

_DL_EXT_DEV = 12  # DLDeviceType kDLExtDev, which torch maps to PrivateUse1
_HOST = torch.device("cpu")
# Redispatching to CPU kernels that only rewrite a tensor's metadata (set_, as_strided) works on any device.
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
# Where DLTensor.device sits in each capsule kind: after the data pointer, behind DLManagedTensorVersioned's header
# (version, manager_ctx, deleter, flags) in the versioned kind.
_POINTER = ctypes.sizeof(ctypes.c_void_p)
_DEVICE_OFFSET = {b"dltensor": _POINTER, b"dltensor_versioned": 8 + 2 * _POINTER + 8 + _POINTER}


def _is_npu(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "npu"


def _device_tensor(cpu: torch.Tensor, index: int) -> torch.Tensor:
    """A plain ``npu:index`` tensor over ``cpu``'s storage, which it keeps alive. The npu storage starts where the
    CPU one does, so that views of ``cpu`` become views of one npu storage."""
    storage = cpu.untyped_storage()
    whole = cpu if cpu.storage_offset() == 0 and cpu.is_contiguous() and cpu.nbytes == storage.nbytes() else None
    if whole is None:
        whole = torch.empty(0, dtype=cpu.dtype).set_(storage, 0, (storage.nbytes() // cpu.element_size(),), (1,))
    capsule = torch.utils.dlpack.to_dlpack(whole)
    name = _capsule_name(capsule)
    device = (ctypes.c_int32 * 2).from_address(_capsule_pointer(capsule, name) + _DEVICE_OFFSET[name])
    device[0], device[1] = _DL_EXT_DEV, index
    tensor = torch.from_dlpack(capsule)
    return tensor if whole is cpu else _view_of(tensor, cpu)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over an npu tensor's memory, for running one operator: it does not keep that memory alive."""
    storage = tensor.untyped_storage()
    host = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), _HOST, storage.nbytes())
    return torch.empty(0, dtype=tensor.dtype).set_(host, tensor.storage_offset(), tensor.size(), tensor.stride())


def _view_of(base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An npu view of ``base``'s storage with ``like``'s sizes, strides and offset."""
    return torch.ops.aten.as_strided.default.redispatch(_CPU_KEYS, base, like.size(), like.stride(),
                                                        like.storage_offset())


def _rebind(tensor: torch.Tensor, host: torch.Tensor) -> None:
    """Make an npu tensor show what an operator did to the CPU tensor that stood for it (out=, resize_, set_)."""
    if host.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        storage = tensor.untyped_storage()
    else:  # the operator gave it new memory, which becomes an npu storage
        _account(host, tensor.device.index)
        storage = _device_tensor(host, tensor.device.index).untyped_storage()
    torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
        _CPU_KEYS, tensor, storage, host.storage_offset(), host.size(), host.stride())


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
            _libraries[0].fallback(_sparse_fallback, dispatch_key="SparsePrivateUse1")
            for name in _sparse_operators():  # a generic kernel would win over the fallback, as for dense
                _libraries[1].impl(name, functools.partial(_sparse_fallback, _overload(name)), "SparsePrivateUse1")
            for name in _whole_operators():
                _libraries[1].impl(name, functools.partial(_fallback, _overload(name)), "PrivateUse1")
            # SDPA is composite. A device sees it whole (and can pick its fused kernel) with autograd off, in
            # inference mode; under autograd it is split into the math steps, as before a backend kernel.
            _libraries[1].impl("scaled_dot_product_attention", functools.partial(_fallback, _SDPA), "PrivateUse1")
            _libraries[1].impl("scaled_dot_product_attention", _SDPA.decompose, "AutogradPrivateUse1")
            # torch_npu has LSTM kernels of its own (op-plugin's lstm.input and lstm.data): taken whole,
            # as torch's own split of them calls a fused cell only CUDA has. Inference only: under autograd they
            # are still split, and that cell does not run here.
            for name in _RNN_OPERATORS:
                _libraries[1].impl(name, functools.partial(_fallback, _overload(name)), "PrivateUse1")
            torch.Tensor.new_tensor = _new_tensor_on_its_device(torch.Tensor.new_tensor)
            torch.UntypedStorage.__new__ = _npu_storages(torch.UntypedStorage.__new__)
            for kind in (torch.Tensor, torch.nn.Parameter):
                ForkingPickler.register(kind, _reduce_across_processes)
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


def _whole_operators() -> list[str]:
    """The aten operators with a generic kernel, which PyTorch would run in preference to a backend fallback, splitting
    them into other operators before they reach the device (layer_norm into its math steps, tanh into an allocation
    and tanh.out): taken whole, each runs on the CPU as the CPU runs it and counts as one operator."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    generic = ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
    names = [name for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("aten::") and any(has(name, key) for key in generic)]
    # Views stay generic: their kernels only describe memory, and detach must come back without a Python object
    # (nn.Parameter makes its own around it).
    return [name.removeprefix("aten::") for name in names if not _is_view(_overload(name))]


def _overload(name: str) -> torch._ops.OpOverload:
    packet, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _new_tensor_on_its_device(new_tensor: Any) -> Any:
    # torch puts the result on the device guard's current device, having set it to the tensor's; the Python device
    # guard cannot be set, so an npu tensor names its device itself.
    @functools.wraps(new_tensor)
    def wrapper(self: torch.Tensor, data: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is None and self.device.type == "npu":
            kwargs["device"] = self.device
        return new_tensor(self, data, **kwargs)

    return wrapper


def _npu_storages(new: Any) -> Any:
    # torch makes a storage on a device (torch.load, deepcopy, Storage.to) with that device's C++ allocator, which
    # Python cannot register, and crashes without one: an npu storage is made on the host and moved instead.
    def wrapper(cls: type, *args: Any, device: _DeviceLike | None = None, **kwargs: Any) -> torch.UntypedStorage:
        if not (isinstance(device, (str, torch.device)) and torch.device(device).type == "npu"):
            return new(cls, *args, **kwargs) if device is None else new(cls, *args, device=device, **kwargs)
        host = new(cls, *args, **kwargs)
        return torch.empty(0, dtype=torch.uint8).set_(host).to(device).untyped_storage()

    return staticmethod(functools.wraps(new)(wrapper))


def _reduce_across_processes(tensor: torch.Tensor) -> tuple[Any, ...]:
    # torch shares a device tensor with another process through its device's IPC, which a Python backend lacks:
    # an npu tensor travels through shared host memory and lands on the same npu there.
    if tensor.device.type != "npu":
        return reductions.reduce_tensor(tensor)
    return _rebuild_on_npu, (type(tensor), tensor.detach().cpu(), str(tensor.device), tensor.requires_grad)


def _rebuild_on_npu(kind: type, host: torch.Tensor, device: str, requires_grad: bool) -> torch.Tensor:
    tensor = host.to(device)
    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)


# --- dispatch ----------------------------------------------------------------------------------------------------


def _fallback(func: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    return _run(func, args, kwargs)


def _run(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any]) -> Any:
    if func is _SDPA and _unfused_sdpa(args, kwargs):
        return func.decompose(*args, **kwargs)  # the math path: each of its steps is a launch of its own
    name = func.name()
    tensors = [x for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]
    npu_tensors = [t for t in tensors if _is_npu(t)]
    target = kwargs.get("device")  # factory operators say where their result goes
    if target is None:
        out_index = npu_tensors[0].device.index if npu_tensors else None
    else:
        out_index = _index(target) if target.type == "npu" else None
        target = torch.device("npu", out_index) if target.type == "npu" else target
    if name not in _COPY_OPS:
        _check_same_device(name, _device_operands(func, args, kwargs, tensors))
    devices = {t.device for t in tensors} | ({target} if target is not None else set())
    transfer = name == "aten::_local_scalar_dense" or (name in _COPY_OPS and len(devices) > 1)
    kernel = not (transfer or name in _SET_OPS or name in _NO_KERNEL_OPS or _is_view(func))
    index = npu_tensors[0].device.index if npu_tensors else out_index
    capture = _capture_on(index)
    if capture is not None and (transfer or name in _DATA_DEPENDENT_OPS):
        capture.failed = name
        raise RuntimeError(_CAPTURE_ERROR)
    _record(index, name, tensors, kernel, capturing=capture is not None)
    if name in _SET_OPS:  # only metadata changes, and the CPU kernels for that work on any device
        output = func.redispatch(_CPU_KEYS, *args, **kwargs)
        if capture is not None:
            capture.record(func, args, kwargs, output)
        return output

    hosts = {id(t): _stand_in(func, t, args, kwargs) for t in npu_tensors}

    def to_cpu(x: Any) -> Any:
        if _is_npu(x):
            return hosts[id(x)]
        if isinstance(x, torch.device) and x.type == "npu":
            return _HOST
        return x

    try:
        result = func(*pytree.tree_map(to_cpu, args), **pytree.tree_map(to_cpu, kwargs))
    except RuntimeError as error:
        if "not resizable" not in str(error):
            raise
        # An out= tensor too small for the result, which torch still resizes (with a warning): it needs memory that
        # can grow. Out= operators resize before they compute, so nothing was written yet.
        for t in npu_tensors:
            if any(value is t for value in kwargs.values()):
                hosts[id(t)] = _growable(hosts[id(t)])
        result = func(*pytree.tree_map(to_cpu, args), **pytree.tree_map(to_cpu, kwargs))
    # In-place and out= operators return their argument: hand back the caller's tensor. A result in an argument's
    # memory is a view of it; anything else is new memory on the output device.
    inputs = {id(hosts[id(t)]): t for t in npu_tensors}
    bases = {t.untyped_storage().data_ptr(): t for t in npu_tensors if t.untyped_storage().data_ptr()}

    def to_npu(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_sparse:  # to_sparse and friends: new memory, on the device the operator ran on
            return x if out_index is None else _sparse_on(x, out_index)
        original = inputs.get(id(x))
        if original is not None:
            if (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride()) != (
                    original.untyped_storage().data_ptr(), original.storage_offset(), original.shape,
                    original.stride()):
                _rebind(original, x)
            return original
        base = bases.get(x.untyped_storage().data_ptr())
        if base is not None:
            return _view_of(base, x)
        if out_index is None:
            return x
        _account(x, out_index)
        return _device_tensor(x, out_index)

    host_result = _HOST_RESULTS.get(name)
    if host_result is None:
        output = pytree.tree_map(to_npu, result)
    else:
        output = tuple(part if position == host_result else to_npu(part) for position, part in enumerate(result))
    if capture is not None:
        capture.record(func, args, kwargs, output)
    return output


def _stand_in(func: torch._ops.OpOverload, tensor: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The CPU tensor an operator runs on in place of an npu tensor: an alias of its memory, unless the operator
    may have to give it more memory (an empty out= tensor, a growing resize_), which an alias cannot get."""
    host = _host(tensor)
    if tensor.numel() == 0 and _writes(func) and any(value is tensor for value in kwargs.values()):
        return torch.empty(0, dtype=tensor.dtype)
    if func.name() == "aten::resize_" and args[0] is tensor:
        needed = (tensor.storage_offset() + math.prod(args[1])) * tensor.element_size()
        if needed > host.untyped_storage().nbytes():
            return _growable(host)
    return host


def _growable(host: torch.Tensor) -> torch.Tensor:
    """A copy of ``host`` in CPU memory of its own, which an operator can resize."""
    return torch.empty(0, dtype=host.dtype).set_(
        host.untyped_storage().clone(), host.storage_offset(), host.size(), host.stride())


@functools.cache
def _writes(func: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


@functools.cache
def _is_view(func: torch._ops.OpOverload) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _device_operands(func: torch._ops.OpOverload, args: tuple, kwargs: dict[str, Any],
                     tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of an operator call that must be on its device: all but the operand torch keeps on the host."""
    host_argument = _HOST_ARGUMENTS.get(func.name())
    if host_argument is None:
        return tensors
    names = [argument.name for argument in func._schema.arguments]
    given = kwargs.get(host_argument, args[names.index(host_argument)] if names.index(host_argument) < len(args)
                       else None)
    return [t for t in tensors if t is not given or t.device.type != "cpu"]


def _check_same_device(name: str, tensors: list[torch.Tensor]) -> None:
    # CPU scalars (0-dim) mix with device tensors, as on CUDA; anything else on another device is a plumbing bug.
    on = {t.device for t in tensors if _is_npu(t) or (t.dim() > 0 and name not in _CPU_OPERAND_OPS)}
    if len(on) > 1 and any(d.type == "npu" for d in on):
        first, second = sorted(on, key=str)[:2]
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}! "
            f"(operator {name})"
        )


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


# --- sparse tensors ----------------------------------------------------------------------------------------------
# torch_npu holds sparse COO tensors on the device (its native API tables list to_sparse_coo, coalesce,
# is_coalesced, sparse_resize_; its tests build torch.sparse_coo_tensor from npu indices and values and check that
# to_sparse on npu:1 keeps indices and values on npu:1). Here an npu COO tensor is PyTorch's own SparseTensorImpl
# whose indices and values are npu tensors. Operators that only read or set those fields run PyTorch's SparseCPU
# kernels on it as it is; every other operator runs on a CPU COO tensor over the same memory, and a COO result
# comes back to the device as new npu indices and values. Each counts as one launch (and compiles once per
# signature), as the dense operators do. Not emulated: the compressed layouts (CSR, CSC, BSR, BSC), which raise
# here; and which sparse operators the chip lacks (older CANN tables mark torch.sparse.mm unsupported): every COO
# operator runs as the CPU runs it. A sparse operator in graph capture raises (its output size depends on data).

_SPARSE_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.SparseCPU)
_SPARSE_NEW = torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default
# Operators whose SparseCPU kernels only read or set a COO tensor's fields (or alias its indices and values).
_SPARSE_FIELD_OPS = frozenset({
    "aten::_indices", "aten::_values", "aten::indices", "aten::values", "aten::_nnz", "aten::sparse_dim",
    "aten::dense_dim", "aten::_dimI", "aten::_dimV", "aten::is_coalesced", "aten::_coalesced_",
    "aten::_sparse_coo_tensor_with_dims_and_tensors", "aten::_sparse_coo_tensor_with_dims",
    "aten::sparse_resize_", "aten::sparse_resize_and_clear_",
})


def _sparse_operators() -> list[str]:
    """The aten operators PyTorch has a sparse CPU kernel for: on npu each runs as that kernel does."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [name.removeprefix("aten::") for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("aten::") and has(name, "SparseCPU")]


class _current_device:
    """The emulator's current device set to ``index`` for a block: PyTorch makes a new sparse tensor's fields on the
    current device and then requires them on the tensor's, so a tensor for npu:N is made with npu:N current."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self) -> None:
        self.previous = _require().current
        _require().current = self.index

    def __exit__(self, *exc: object) -> None:
        _require().current = self.previous


def _sparse_on(cpu: torch.Tensor, index: int) -> torch.Tensor:
    """An npu:``index`` COO tensor holding a CPU COO tensor's indices and values (their memory becomes the device's)."""
    fields = []
    for part in (cpu._indices(), cpu._values()):
        _account(part, index)
        fields.append(_device_tensor(part, index))
    with _current_device(index):
        return _SPARSE_NEW.redispatch(_SPARSE_CPU_KEYS, cpu.sparse_dim(), cpu.dense_dim(), cpu.shape, *fields,
                                      dtype=cpu.dtype, layout=torch.sparse_coo, device=torch.device("npu", index),
                                      pin_memory=None, is_coalesced=cpu.is_coalesced())


def _sparse_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU COO tensor over an npu COO tensor's indices and values, for running one operator."""
    return torch.sparse_coo_tensor(_host(tensor._indices()), _host(tensor._values()), tensor.shape,
                                   is_coalesced=tensor.is_coalesced(), check_invariants=False)


def _sparse_fallback(func: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    name = func.name()
    tensors = [x for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]
    if any(t.layout not in (torch.strided, torch.sparse_coo) for t in tensors):
        raise NotImplementedError(f"the npu emulator holds sparse tensors in COO layout only (operator {name})")
    npu_tensors = [t for t in tensors if _is_npu(t)]
    target = kwargs.get("device")
    if target is not None and target.type == "npu":
        out_index: int | None = _index(target)
    else:
        out_index = npu_tensors[0].device.index if npu_tensors and target is None else None
    index = npu_tensors[0].device.index if npu_tensors else out_index
    if name not in _COPY_OPS:
        _check_same_device(name, tensors)
    if _capture_on(index) is not None:
        _capture_on(index).failed = name
        raise RuntimeError(_CAPTURE_ERROR)
    if name in _SPARSE_FIELD_OPS:
        _record(index, name, tensors, kernel=False)
        with _current_device(out_index if out_index is not None else index):
            return func.redispatch(_SPARSE_CPU_KEYS, *args, **kwargs)
    transfer = name in _COPY_OPS and len({t.device for t in tensors} | ({target} if target else set())) > 1
    _record(index, name, tensors, kernel=not transfer)
    hosts = {id(t): _sparse_host(t) if t.is_sparse else _host(t) for t in npu_tensors}

    def to_cpu(x: Any) -> Any:
        if _is_npu(x):
            return hosts[id(x)]
        return _HOST if isinstance(x, torch.device) and x.type == "npu" else x

    result = func(*pytree.tree_map(to_cpu, args), **pytree.tree_map(to_cpu, kwargs))
    originals = {id(hosts[id(t)]): t for t in npu_tensors}

    def to_npu(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        original = originals.get(id(x))
        if original is not None:  # in place: a dense argument's memory has the result; a sparse one gets new fields
            if original.is_sparse:
                torch.ops.aten.copy_.default.redispatch(_SPARSE_CPU_KEYS, original, _sparse_on(x, index))
            return original
        if out_index is None:
            return x
        if x.is_sparse:
            return _sparse_on(x, out_index)
        _account(x, out_index)
        return _device_tensor(x, out_index)

    return pytree.tree_map(to_npu, result)


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
                capture.storages[key] = (storage.data_ptr(), nbytes)
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
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


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
        self.slots: dict[int, tuple[int, weakref.ref]] = {}  # id of an npu tensor made here -> (slot, the tensor)
        self.storages: dict[int, tuple[int, int]] = {}  # live pool storages made by this capture -> (pointer, bytes)
        self.counter = -1
        self.failed: str | None = None

    def record(self, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = [x for x in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(x, torch.Tensor)]

        def template(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                known = self.slots.get(id(x))
                if known is not None and known[1]() is x:
                    return _Slot(known[0])
            elif isinstance(x, torch.device) and x.type == "npu":
                return _HOST
            return x  # made before capture (weights, static inputs): replays read its current data

        outputs = []
        for leaf in pytree.tree_leaves(output):
            if not isinstance(leaf, torch.Tensor) or any(leaf is x for x in inputs):  # in-place: the input stands
                outputs.append(None)
                continue
            number = self.counter = self.counter + 1
            self.slots[id(leaf)] = (number, weakref.ref(leaf))
            outputs.append((number, weakref.ref(leaf)))
        self.launches.append((func, pytree.tree_map(template, args), pytree.tree_map(template, kwargs), outputs))

    def garbage(self) -> None:
        """What capture computed is not there on hardware: overwrite every buffer made from pool memory."""
        pool = {ptr for ptr, _ in self.storages.values()}
        for _, tensor_ref in self.slots.values():
            tensor = tensor_ref()
            if tensor is not None and tensor.untyped_storage().data_ptr() in pool:
                _host(tensor).fill_(float("nan") if tensor.is_floating_point() else -1)


def _capture_on(index: int | None) -> _Capture | None:
    """The capture recording this thread's work on npu:``index``: another thread's work goes to its own stream."""
    capture = None if index is None or _emulator is None else _emulator.captures.get(index)
    return capture if capture is not None and capture.thread == threading.get_ident() else None


def _unfused_sdpa(args: tuple, kwargs: dict) -> bool:
    """Whether torch_npu would not send this SDPA call to npu_fusion_attention (a non-bool mask, non-4-D inputs, or a
    chip before the 910B: op-plugin's ScaledDotProductAttention kernel); counts such calls."""
    query, index = args[0], args[0].device.index
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    fused = (query.dim() == 4 and (mask is None or mask.dtype == torch.bool)
             and not _require().chip.startswith(("Ascend910A", "Ascend310")))
    if not fused:
        with _lock:
            _require().devices[index].sdpa_unfused += 1
    return not fused


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
            if isinstance(x, _Slot):
                return values[x.number]
            return _host(x) if _is_npu(x) else x

        with torch.inference_mode():
            for position, (func, args, kwargs, outputs) in enumerate(self._launches):
                result = func(*pytree.tree_map(fill, args), **pytree.tree_map(fill, kwargs))
                for leaf, out in zip(pytree.tree_leaves(result), outputs):
                    if out is None:
                        continue
                    values[out[0]] = leaf
                    captured = out[1]()
                    if captured is not None and captured is not leaf and captured.data_ptr() != leaf.data_ptr():
                        _host(captured).copy_(leaf)  # a buffer someone holds (the graph's outputs) gets the new data
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
