"""What several ``st-npu`` commands share: the model options, number parsing, output-folder checks, and loading
the model those options name. Nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from st_npu.errors import UsageError
from st_npu.loading.folder import DEFAULT_MODEL  # folder.py imports no torch, as the command modules must not
from st_npu.runtime import emulation
from st_npu.runtime.hints import not_installed_message


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--spec``, ``--device`` and ``--dtype``, as every model-loading command takes them."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or hub id (default {DEFAULT_MODEL}, through the hub cache)")
    parser.add_argument("--spec", default=None,
                        help="known model the folder holds, when its name does not say (e.g. BAAI/llm-embedder)")
    parser.add_argument("--device", default=None, help="auto (default), npu, npu:N, cpu, cuda:N")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-batch-tokens``: the token budget of one batch, as ``max_batch_tokens=`` of the model classes."""
    parser.add_argument("--max-batch-tokens", type=positive_int, default=None,
                        help="padded tokens (rows x length) per batch (default 16384, TEI's): long texts run fewer "
                             "rows per batch, a text longer than this alone")


def positive_int(text: str) -> int:
    """An argparse type whose message reads "must be a positive integer", not "invalid _positive_int value"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_output_folder(option: str, value: str | None) -> None:
    """Refuse, before any work, an output that could not be written at the end."""
    if value and not Path(value).resolve().parent.is_dir():
        raise UsageError(f"{option} {value}: folder {Path(value).resolve().parent} does not exist")


def write_json(path: Path, content: dict[str, Any]) -> None:
    """A report as indented UTF-8 JSON, written atomically (never half a file)."""
    from st_npu.files.outputs import atomic_file

    with atomic_file(path) as handle:
        handle.write(json.dumps(content, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")


def check_device(device: str | None) -> None:
    """Refuse ``--device npu`` where this machine has no npu at all, before the imports that take seconds: no
    torch_npu, and no emulated npu (or one whose variables are wrong). Everything else is the device code's."""
    if device is None or device.strip().lower().partition(":")[0] != "npu":
        return
    if "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is not None:  # real, or emulated here
        return
    problem = emulation.environment_problem()
    if problem:
        raise UsageError(f"--device {device}: the emulated npu cannot start: {problem}")
    if not emulation.requested():
        raise UsageError(not_installed_message(importlib.metadata.version("torch")))


def load_model(args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``st_npu.SentenceTransformer`` that ``--model/--spec/--device/--dtype`` name (``overrides`` win).

    Imported here, on first use: a torch_npu that cannot load then becomes a message with the fix
    (``st_npu.__getattr__``) instead of a traceback from ``import torch``.
    """
    options = {"device": args.device, "dtype": args.dtype, "spec": getattr(args, "spec", None), **overrides}
    check_device(options["device"])
    from st_npu import SentenceTransformer

    return SentenceTransformer(args.model, **options)
