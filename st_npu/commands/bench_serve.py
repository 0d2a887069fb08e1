"""``st-npu bench-serve``: load test on 127.0.0.1, the batching server against one-at-a-time; with several named
models, each model alone against all of them sharing one server under mixed load."""

from __future__ import annotations

import argparse

from st_npu.commands.serve import add_server_arguments, model_entries
from st_npu.commands.options import positive_int
from st_npu.serve.deployment import is_named

HELP = "load test: the batching server against one-at-a-time, or several models alone against together"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--clients", default="1,16,64", help="concurrent clients per run (default 1,16,64)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--max-requests", type=positive_int, default=20000,
                        help="stop a run after this many requests (default 20000)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from st_npu.serve import require_serve_stack

    require_serve_stack()
    entries = model_entries(args)  # bad model options are a usage error before any server starts
    mixed = args.deployment or sum(map(is_named, args.model or [])) > 1
    from st_npu.evaluation.bench_serve import run_bench_serve

    return run_bench_serve(args, entries if mixed else None)
