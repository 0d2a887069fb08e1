"""What goes wrong when torch_npu loads, and the fix to print: shared by the package import, the device code and
``st-npu info``.

Imports nothing heavy: where torch_npu is installed but CANN is not sourced, ``import torch`` itself fails, and
the messages are needed exactly there.
"""

from __future__ import annotations

import re

CANN_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (the CANN toolkit) before starting Python"
INSTALL_HINT = 'pip install "st-npu[npu]" (torch-npu must have the same version as torch, here {torch})'
CANN_LIBRARY = re.compile(r"lib(hccl|ascend\w*|acl\w*|runtime|ge_runner|graph)\.so")


def is_torch_npu_failure(exc: BaseException) -> bool:
    """Whether an import failed because torch_npu could not load (and not for an unrelated reason)."""
    text = str(exc)
    return bool(CANN_LIBRARY.search(text)) or "torch_npu" in text


def explain_torch_npu_failure(exc: BaseException | str) -> str:
    """Turn torch_npu's import failures (with or without torch's autoload) into a message with the fix."""
    text = str(exc).strip()
    if CANN_LIBRARY.search(text) or "backend extension" in text:
        return f"torch_npu is installed but the Ascend CANN libraries are not loaded ({text}). Fix: {CANN_HINT}."
    return f"torch_npu is installed but failed to load: {text}"
