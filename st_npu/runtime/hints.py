"""What goes wrong when torch_npu loads, and the fix to print: shared by the package import, the device code and
``st-npu info``.

Imports nothing heavy: where torch_npu is installed but CANN is not sourced, ``import torch`` itself fails, and
the messages are needed exactly there.
"""

from __future__ import annotations

import re

CANN_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (the CANN toolkit) before starting Python"
INSTALL_HINT = 'pip install "st-npu[npu]" (torch-npu must have the same version as torch, here {torch})'
EXPLAINED = "torch_npu is installed but"
CANN_LIBRARY = re.compile(r"lib(hccl|ascend\w*|acl\w*|runtime|ge_runner|graph)\.so")


def not_installed_message(torch_version: str) -> str:
    return (f"An NPU was requested but torch_npu is not installed. Install it with "
            f"{INSTALL_HINT.format(torch=torch_version.split('+')[0])}.")


def is_torch_npu_failure(exc: BaseException) -> bool:
    """Whether an import failed because torch_npu could not load (and not for an unrelated reason)."""
    text = str(exc)
    return bool(CANN_LIBRARY.search(text)) or "torch_npu" in text


def explain_torch_npu_failure(exc: BaseException | str) -> str:
    """Turn torch_npu's import failures (with or without torch's autoload) into a message with the fix; a message
    this function made already (``st_npu``'s lazy import re-raises it) comes back unchanged."""
    text = str(exc).strip()
    if text.startswith(EXPLAINED):
        return text
    if CANN_LIBRARY.search(text) or "backend extension" in text:
        return f"{EXPLAINED} the Ascend CANN libraries are not loaded ({text}). Fix: {CANN_HINT}."
    return f"{EXPLAINED} failed to load: {text}"


def load_failure_message(exc: BaseException) -> str | None:
    """The message with the fix where ``exc`` is torch_npu failing to load: raised by ``import torch`` (autoload),
    by ``import torch_npu`` without CANN, or already explained by ``st_npu``'s lazy import. None for anything else,
    such as an operator failing on a working NPU."""
    text = str(exc).strip()
    if text.startswith(EXPLAINED) or CANN_LIBRARY.search(text) or "backend extension: torch_npu" in text:
        return explain_torch_npu_failure(text)
    return None
