"""The emulated npu: a CPU-backed ``npu`` device standing in for torch_npu in tests and CI (:mod:`.backend`).

torch loads it as it loads torch_npu, through the ``torch.backends`` entry point that ``import torch`` calls
(``TORCH_DEVICE_BACKEND_AUTOLOAD``), so spawned workers and subprocesses get the same device their parent had. It
installs only where ``ST_NPU_EMULATE`` asks for it (see :mod:`.settings`); ``import st_npu`` installs nothing.
"""

from __future__ import annotations

import os
import warnings

from st_npu.emulator import settings


def autoload() -> None:
    """torch's backend autoload hook. A bad setting is a warning here, not an ``import torch`` failure, so that
    ``st-npu info`` can still run and report it."""
    if not os.environ.get(settings.ENV):
        return
    problem = settings.env_problem()
    if problem is None:
        from st_npu.emulator import backend

        try:
            backend.install_from_env()
        except RuntimeError as exc:  # a real torch_npu is installed: it owns the npu device
            problem = str(exc)
    if problem is not None:
        warnings.warn(f"the emulated npu is not installed: {problem}", RuntimeWarning, stacklevel=2)
