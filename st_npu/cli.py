"""The ``st-npu`` command (also ``python -m st_npu``): one subcommand per module of :mod:`st_npu.commands`.

This is the top of the package: it builds the parser from the command table and hands each command to its module;
nothing imports it. Nothing here imports torch: where torch_npu is installed without CANN, ``import torch`` fails,
and the command must still explain that instead of printing a traceback. Exit codes: 0 success, 1 a check failed
(``verify``, ``info`` with problems), 2 a usage or load error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from st_npu import __version__
from st_npu.commands import COMMANDS
from st_npu.errors import UsageError


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"st_npu.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-npu", description="sentence-transformers embeddings on Ascend NPUs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        module.add_arguments(subparsers.add_parser(name, help=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return command_module(args.command).run(args)
    except KeyboardInterrupt:
        print("st-npu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            print(f"st-npu {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: Exception) -> bool:
    if isinstance(exc, (UsageError, ValueError, TypeError, OSError)):
        return True
    if isinstance(exc, RuntimeError) and ("torch_npu" in str(exc) or "backend extension" in str(exc)):
        return True  # raised by `import torch` itself when torch_npu cannot load (see st_npu.runtime.hints)
    from st_npu.runtime.devices import DeviceError

    return isinstance(exc, DeviceError)
