"""The one module through which st_npu's own code reaches the emulated npu (:mod:`st_npu.emulator`).

Production code asks two things of the emulator: whether a device is emulated, and the counters only an emulator
can keep (operators, launches, compiles, graph replays). Both come from here, as typed values, so nothing else
imports the emulator or reads its counters through string keys. Installing it is explicit: ``install_from_env``
(the CLI at start, worker bootstraps) or torch's backend autoload, as torch_npu is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class Counters:
    """What the emulator has counted on one device since install or :func:`reset_counters`."""

    ops: int  # operators dispatched
    launches: int  # work put on the device: kernels, transfers; a graph replay is one
    compiles: int  # new operator signatures, as Ascend compiles them
    replays: int  # graph replays
    sdpa_unfused: int  # SDPA calls that miss the fused kernel

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, name) - getattr(other, name) for name in self.__dataclass_fields__))


def active() -> bool:
    """Whether ``npu`` in this process is the emulator (never true beside a real torch_npu)."""
    return bool(getattr(sys.modules.get("torch_npu"), "__emulated__", False))


def is_emulated(device: Any) -> bool:
    """Whether ``device`` (a ``torch.device`` or a device string) is an emulated npu."""
    kind = getattr(device, "type", str(device).partition(":")[0])
    return kind == "npu" and active()


def counters(device: Any) -> Counters | None:
    """The emulator's counters for an emulated ``npu:N``; None for any other device."""
    if not is_emulated(device):
        return None
    from st_npu.emulator import backend

    index = int(device.partition(":")[2] or 0) if isinstance(device, str) else device.index or 0
    stats = backend.stats()["per_device"][index]
    return Counters(stats["ops"], stats["launches"], stats["compiles"], stats["replays"], stats["sdpa_unfused"])


def reset_counters() -> None:
    """Zero every device's counters (the compile caches stay, as a device keeps its compiled operators)."""
    if active():
        from st_npu.emulator import backend

        backend.reset_stats()


def physical_device_count() -> int | None:
    """The emulated machine's device count before ``ASCEND_RT_VISIBLE_DEVICES``; None when nothing is emulated."""
    if not active():
        return None
    from st_npu.emulator import backend

    return backend.physical_device_count()


def ensure_installed(devices: int) -> None:
    """In a spawned worker: make ``npu`` the emulator with the parent's device count, unless it already is."""
    from st_npu.emulator import backend

    if not backend.is_installed():
        backend.install(devices=devices)


def install_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the emulator when ``ST_NPU_EMULATE`` asks for it; returns whether it did. A bad value raises
    ``ValueError`` naming the variable (see :func:`environment_problem`)."""
    from st_npu.emulator import backend

    return backend.install_from_env(environ)


def environment_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong with this environment's emulator variables, without installing anything; None if nothing."""
    from st_npu.emulator import settings

    return settings.env_problem(environ)


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this environment asks for the emulated npu (``ST_NPU_EMULATE`` set), read without installing it."""
    from st_npu.emulator import settings

    return bool(environ.get(settings.ENV))
