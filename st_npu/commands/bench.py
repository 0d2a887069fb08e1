"""``st-npu bench``: st_npu against stock sentence-transformers, side by side."""

from __future__ import annotations

import argparse

from st_npu.options import add_model_arguments, positive_int

HELP = "st_npu against stock sentence-transformers, side by side"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated (default 1,8,32,128)")
    parser.add_argument("--workload", choices=("seed", "mixed"), default="mixed",
                        help="seed: the 23 sentences of the seed port; mixed: zh/en texts of 1 to 512 tokens")
    parser.add_argument("--limit", type=positive_int, help="use only the first N texts of the workload")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed passes per batch size and model")
    parser.add_argument("--graphs", choices=("on", "off"), default="on",
                        help="st_npu's graph mode where the device can capture (default on; emulated npu, Ascend, "
                             "CUDA)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="draw throughput, speed-up and latency against batch size to this PNG "
                                       "(needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    from st_npu.evaluation.bench import run_bench

    return run_bench(args)
