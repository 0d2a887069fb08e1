"""``st-npu verify``: accuracy on the device against a CPU float32 reference."""

from __future__ import annotations

import argparse

from st_npu.options import add_model_arguments

HELP = "accuracy on the device against a CPU float32 reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--texts", help="extra texts, one per line, added to the built-in 23")
    parser.add_argument("--threshold", type=float, default=1.0, help="largest error rate in percent (default 1.0)")
    parser.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--save-reference", help="compute the CPU reference and save it to this file")
    reference.add_argument("--reference", help="use a saved CPU reference instead of computing one")


def run(args: argparse.Namespace) -> int:
    from st_npu.evaluation.verify import run_verify

    return run_verify(args)
