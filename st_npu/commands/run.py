"""``st-npu run``: run an unchanged Python script (or ``-m module``) with the NPU patch active."""

from __future__ import annotations

import argparse

HELP = "run an unchanged Python script (or -m module) with the NPU patch active"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", dest="module", help="run a library module as a script, like python -m")
    parser.add_argument("script", nargs="?", help="the script to run (none with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")


def run(args: argparse.Namespace) -> int:
    from st_npu.errors import UsageError
    from st_npu.patching import run_module, run_script

    if not (args.module or args.script):
        raise UsageError("st-npu run needs a script or -m module")
    if args.module:  # argparse took the module's first argument for the script
        return run_module(args.module, [args.script, *args.args] if args.script else args.args)
    return run_script(args.script, args.args)
