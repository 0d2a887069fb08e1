"""The ``st-npu`` command (also ``python -m st_npu``): one subcommand per module of :mod:`st_npu.commands`.

This is the top of the package: it builds the parser from the command table and hands each command to its module;
nothing imports it. Nothing here imports torch: where torch_npu is installed without CANN, ``import torch`` fails,
and the command must still explain that instead of printing a traceback. Exit codes: 0 success, 1 a check failed
(``verify``, ``info`` with problems) or an unexpected error (with its traceback), 2 a usage, device, input or
model-folder error (one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from types import ModuleType

from st_npu import __version__
from st_npu.commands import COMMANDS
from st_npu.errors import NonFiniteError, UsageError
from st_npu.runtime.hints import load_failure_message


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
        message = user_error_message(exc)
        if message is None:
            traceback.print_exc()
            return 1
        print(f"st-npu {args.command}: error: {message}", file=sys.stderr)
        return 2


def user_error_message(exc: Exception) -> str | None:
    """The one line to show for an error the user can fix; None for anything else (a bug: show its traceback)."""
    if isinstance(exc, (UsageError, NonFiniteError)):
        return str(exc)
    from st_npu.files.inputs import InputError
    from st_npu.loading.folder import ModelFolderError, ModelNotFoundError

    if isinstance(exc, (InputError, ModelFolderError, ModelNotFoundError)):
        return str(exc)
    # Only code that imported torch can raise a DeviceError: look it up without importing torch here.
    devices = sys.modules.get("st_npu.runtime.devices")
    if devices is not None and isinstance(exc, devices.DeviceError):
        return str(exc)
    return load_failure_message(exc)  # `import torch` itself fails where torch_npu cannot load
