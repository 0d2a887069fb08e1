"""Command-line pieces shared by the ``st-npu`` subcommands: the model options, number parsing, and loading
the model those options name. The command module (``st_npu.cli``) and each command's own module build on
this; nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
from typing import Any

from st_npu.loading.folder import DEFAULT_MODEL  # folder.py imports no torch, as the command modules must not


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--spec``, ``--device`` and ``--dtype``, as every model-loading command takes them."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or hub id (default {DEFAULT_MODEL}, through the hub cache)")
    parser.add_argument("--spec", default=None,
                        help="known model the folder holds, when its name does not say (e.g. BAAI/llm-embedder)")
    parser.add_argument("--device", default=None, help="auto (default), npu, npu:N, cpu, cuda:N")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")


def positive_int(text: str) -> int:
    """An argparse type whose message reads "must be a positive integer", not "invalid _positive_int value"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def load_model(args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``st_npu.SentenceTransformer`` that ``--model/--spec/--device/--dtype`` name (``overrides`` win).

    Imported here, on first use: a torch_npu that cannot load then becomes a message with the fix
    (``st_npu.__getattr__``) instead of a traceback from ``import torch``.
    """
    from st_npu import SentenceTransformer

    options = {"device": args.device, "dtype": args.dtype, "spec": getattr(args, "spec", None), **overrides}
    return SentenceTransformer(args.model, **options)
