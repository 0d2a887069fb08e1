"""The emulator's environment variables, read and checked without importing torch.

``ST_NPU_EMULATE`` (a device count), ``ST_NPU_EMULATE_MEMORY_LIMIT`` (bytes per device) and
``ASCEND_RT_VISIBLE_DEVICES``, which the emulator honours as the Ascend runtime does. ``problem`` says what is wrong
with them, so ``st-npu info`` can report it instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "ST_NPU_EMULATE"
MEMORY_ENV = "ST_NPU_EMULATE_MEMORY_LIMIT"
CHIP_ENV = "ST_NPU_EMULATE_CHIP"


def env_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    value = environ[name]
    message = f"{name} must be an integer >= {minimum}, got {value!r}"
    try:
        number = int(value)
    except ValueError:
        raise ValueError(message) from None
    if number < minimum:
        raise ValueError(message)
    return number


def visible_device_count(physical: int, environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    if not value:
        return physical
    listed = [item.strip() for item in value.split(",")]
    problem = next((f"{item!r} is not a device index" for item in listed if not item.isdigit()), None)
    problem = problem or next((f"device {item} does not exist (the emulated machine has {physical}: 0 to "
                               f"{physical - 1})" for item in listed if int(item) >= physical), None)
    if problem is None and len(set(map(int, listed))) != len(listed):
        problem = "a device is listed twice"
    if problem:
        raise RuntimeError(f"ASCEND_RT_VISIBLE_DEVICES={value!r}: {problem}")
    return len(listed)



def env_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong with the emulator's variables (naming the variable), or None; unset means no emulator."""
    if not environ.get(ENV):
        return None
    try:
        devices = env_int(environ, ENV, minimum=1)
        if environ.get(MEMORY_ENV):
            env_int(environ, MEMORY_ENV, minimum=0)
        visible_device_count(devices, environ)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None
