"""``st-npu run``: run an unchanged Python script (or ``-m module``) with the NPU patch active, as ``python``
would run it: everything after the script or module is the script's own arguments, ``-m`` finds modules in the
current folder first, and the exit code is the script's."""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from st_npu.errors import UsageError

HELP = "run an unchanged Python script (or -m module) with the NPU patch active"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "st-npu run [-h] (SCRIPT | -m MODULE) [ARG ...]"
    # Both take the rest of the line, so the script's own options (even -m or -h) never reach st-npu's parser.
    parser.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                        help="run a module as a script, like python -m MODULE [ARG ...]")
    parser.add_argument("script", nargs=argparse.REMAINDER, metavar="SCRIPT",
                        help="the script to run, then its own arguments: SCRIPT [ARG ...]")


def run(args: argparse.Namespace) -> int:
    if args.module is not None:
        if not args.module:
            raise UsageError("-m needs a module name, e.g. st-npu run -m mytool --its-option")
        return run_module(args.module[0], args.module[1:])
    if not args.script:
        raise UsageError("st-npu run needs a script or -m module, e.g. st-npu run embed.py --its-option")
    return run_script(args.script[0], args.script[1:])


def run_script(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv == [script, *args]`` and the patch active; its exit code.

    ``sys.exit(code)`` gives ``code``; an uncaught exception prints its traceback and gives 1, as ``python``
    does. ``sys.argv``, ``sys.path`` and the patch are restored afterwards.
    """
    path = Path(script)
    if not path.is_file():
        raise UsageError(f"no such script: {script}")
    # As `python script.py` does, for the script's own imports.
    with _as_main([script, *args], str(path.resolve().parent)):
        return _run(lambda: runpy.run_path(script, run_name="__main__"), os.path.abspath(script))


def run_module(module: str, args: list[str]) -> int:
    """``python -m module args`` with the patch active: the module runs as ``__main__``, the current folder first
    on ``sys.path``; exit code and restoration as :func:`run_script`. Looking the module up imports its parent
    packages, as ``python -m`` does: the patch is already active then."""
    with _as_main([module, *args], os.getcwd()):
        origin = _module_origin(module)
        return _run(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), origin)


def _module_origin(module: str) -> str | None:
    """The file that runs for ``module`` (a package's ``__main__``); a usage error where ``python -m`` would fail."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package, or a relative name
        spec = None
    if spec is None:
        raise UsageError(f"no module named {module!r} (looked in {os.getcwd()} first, then on sys.path)")
    if spec.submodule_search_locations is not None:
        main = importlib.util.find_spec(f"{module}.__main__")
        if main is None:
            raise UsageError(f"{module!r} is a package without a __main__ module: it cannot be run with -m")
        return main.origin
    return spec.origin


@contextmanager
def _as_main(argv: list[str], path_entry: str) -> Iterator[None]:
    """``sys.argv`` and ``sys.path`` as ``python`` sets them for a main script, and the patch, all undone after."""
    from st_npu.patching import patch

    saved_argv, saved_path = sys.argv, sys.path[:]
    sys.argv = argv
    sys.path.insert(0, path_entry)
    try:
        with patch():
            yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def _run(run: Callable[[], object], main_file: str | None) -> int:
    try:
        run()
        return 0
    except SystemExit as exit_request:
        return _exit_status(exit_request.code)
    except Exception as exc:
        _print_user_traceback(exc, main_file)
        return 1


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
    return 1


def _print_user_traceback(exc: Exception, main_file: str | None) -> None:
    # Start at the user's first frame, as `python script.py` would, hiding st_npu's and runpy's frames; a
    # SyntaxError has no such frame and prints as Python prints it, without a traceback.
    tb = exc.__traceback__
    if main_file is not None:
        while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != main_file:
            tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)
