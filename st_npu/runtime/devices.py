"""Device and dtype selection: which accelerator to run on, and whether it can run there.

Everything that decides or validates a device lives here, so that the model class, the CLI and the patch
agree. Errors are raised before any weights are read and each one says how to fix the problem.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import sys
import warnings
from types import ModuleType

import torch

from st_npu.errors import InvalidValueError
from st_npu.runtime.hints import explain_torch_npu_failure, not_installed_message

ACCELERATOR_TYPES = ("npu", "cuda", "mps", "xpu")
KNOWN_TYPES = ("auto", "cpu", *ACCELERATOR_TYPES)
# Chips before Atlas A2 (910A/910 Pro, 310 series) have no bf16 in their matrix units.
CHIPS_WITHOUT_BF16 = re.compile(r"^Ascend(910A|910Pro|910PremiumA|310)", re.IGNORECASE)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class DeviceError(RuntimeError):
    """A device was asked for that cannot be used; the message says why and how to fix it."""


def load_torch_npu() -> ModuleType:
    """Import torch_npu (registering the ``npu`` device) or explain why it cannot be."""
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"]
    if importlib.util.find_spec("torch_npu") is None:
        raise DeviceError(not_installed_message(torch.__version__))
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        raise DeviceError(explain_torch_npu_failure(exc)) from exc


def npu_count() -> int:
    """NPUs visible to this process, 0 when torch_npu is absent or broken (never raises)."""
    try:
        load_torch_npu()
        return torch.npu.device_count() if torch.npu.is_available() else 0
    except DeviceError:
        return 0


def names_npu(device: object) -> bool:
    """Whether a device argument asks for an NPU (``"npu"``, ``"npu:N"``, ``torch.device("npu", N)``)."""
    if isinstance(device, torch.device):
        return device.type == "npu"
    return isinstance(device, str) and device.strip().lower().partition(":")[0] == "npu"


def default_index() -> int:
    """The accelerator this process owns: its LOCAL_RANK under torchrun-style launchers, else 0."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise DeviceError(f"LOCAL_RANK={value!r} is not an integer") from None


def auto_device() -> torch.device:
    """The best device present: ``npu:{LOCAL_RANK or 0}``, then cuda, mps, xpu, cpu."""
    if npu_count():
        return _checked("npu", default_index())
    if torch.cuda.is_available():
        return _checked("cuda", default_index())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return _checked("xpu", default_index())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Validate a user's device choice and return it with an explicit index.

    ``None``/``"auto"`` pick the best device; a bare ``"npu"`` means this process's NPU (LOCAL_RANK under a
    launcher, else the current one), never silently npu:0 on every rank.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return auto_device()
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    elif isinstance(device, str):
        kind, _, index_text = device.strip().lower().partition(":")
        if kind not in KNOWN_TYPES:
            raise DeviceError(f"Unknown device {device!r}: expected one of auto, cpu, npu, npu:N, cuda, cuda:N, mps, xpu.")
        if index_text and not index_text.isdigit():
            raise DeviceError(f"Device {device!r} has an invalid index {index_text!r}: expected a number like npu:0.")
        index = int(index_text) if index_text else None
    else:
        raise DeviceError(f"device must be a string or torch.device, got {type(device).__name__}: {device!r}")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        load_torch_npu()
        if index is None:
            index = default_index() if "LOCAL_RANK" in os.environ else torch.npu.current_device()
    return _checked(kind, index)


def _checked(kind: str, index: int | None) -> torch.device:
    module = getattr(torch, kind, None)
    available = module is not None and module.is_available()
    if not available:
        hint = " Is CANN loaded and is an NPU visible (npu-smi info, ASCEND_RT_VISIBLE_DEVICES)?" if kind == "npu" else ""
        raise DeviceError(f"Device {kind!r} was requested but no {kind} device is available.{hint}")
    if kind == "mps":
        return torch.device("mps")
    index = 0 if index is None else index
    count = module.device_count()
    if index >= count:
        raise DeviceError(
            f"Device {kind}:{index} does not exist: this process sees {count} {kind} device(s)"
            f"{f', {kind}:0 to {kind}:{count - 1}' if count else ''}."
        )
    return torch.device(kind, index)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` keeps the checkpoint's float32; otherwise float32, float16 or bfloat16 by name or torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise InvalidValueError(f"Unsupported dtype {dtype!r}: use float32, float16 or bfloat16 (or the torch dtypes).")


def cpu_name() -> str:
    """The CPU's model name, as figures measured on it should say (the CPUs of machines here differ)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_units() -> str | None:
    """The CPU's bfloat16 matrix units (``"AMX"``, ``"AVX512-BF16"``), or None where torch emulates bfloat16."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    units = [unit for unit, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    return ", ".join(units) or None


_warned_slow_bf16 = False


def check_dtype_supported(device: torch.device, dtype: torch.dtype | None) -> None:
    """bf16 on an Ascend chip without bf16 units would fail deep inside CANN: say so up front. bf16 on a CPU
    without bf16 units runs, about 3x slower than float32 (torch emulates it): warn once per process."""
    global _warned_slow_bf16
    if device.type == "cpu" and dtype == torch.bfloat16 and not _warned_slow_bf16 and cpu_bf16_units() is None:
        _warned_slow_bf16 = True
        warnings.warn(f"bfloat16 on this CPU ({cpu_name()}) is emulated: it has neither AMX nor AVX512-BF16, so "
                      f"bfloat16 runs about 3x slower than float32 here. Use dtype='float32' on this machine.",
                      RuntimeWarning, stacklevel=3)
    if device.type == "npu" and dtype == torch.bfloat16:
        chip = torch.npu.get_device_name(device.index or 0)
        if CHIPS_WITHOUT_BF16.match(chip):
            raise DeviceError(f"{chip} (npu:{device.index}) has no bfloat16 support; use dtype='float16' or 'float32'.")


def graph_capture_unavailable(device: torch.device) -> str | None:
    """Why graphs cannot be captured on ``device`` (None when they can)."""
    module = getattr(torch, device.type, None)
    if device.type == "npu":
        if not hasattr(module, "NPUGraph"):
            return "this torch_npu has no torch.npu.NPUGraph (graph capture needs torch_npu 2.5.1 or newer)"
        name = module.get_device_name(device.index)
        if "910A" in name:
            return f"{name} cannot capture graphs (910B and newer can)"
        return None
    if device.type == "cuda":
        return None if hasattr(module, "CUDAGraph") else "this torch has no torch.cuda.CUDAGraph"
    return f"graph capture runs on npu and cuda, not {device.type}"
