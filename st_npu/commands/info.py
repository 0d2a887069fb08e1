"""``st-npu info``: versions, devices and what is broken, with the fix."""

from __future__ import annotations

import argparse
import json

HELP = "versions, devices and what is broken, with the fix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from st_npu.runtime import doctor

    report = doctor.collect()
    print(json.dumps(report, indent=2) if args.json else doctor.format_report(report))
    return 1 if report["problems"] else 0
