"""``st-npu verify``: accuracy on the device against a CPU float32 reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from st_npu.commands.options import add_model_arguments, check_device, check_output_folder, write_json

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
    """0 passed (or reference saved), 1 failed; bad input raises for exit code 2."""
    check_output_folder("--json", args.json_path)
    check_output_folder("--save-reference", args.save_reference)
    if not args.save_reference:  # saving never opens the target device
        check_device(args.device)
    from st_npu.loading.folder import is_reranker, resolve_model_path

    if is_reranker(resolve_model_path(args.model)):
        return _verify_reranker(args)
    from st_npu.evaluation import verify

    verify.check_threshold(args.threshold)
    texts = verify.verify_texts(args.texts)
    if args.save_reference:
        metadata = verify.make_reference(args.model, texts, Path(args.save_reference), spec=args.spec,
                                         texts_file=args.texts)
        print(verify.format_saved(metadata, args.save_reference))
        if args.device or args.dtype:
            print("  note      --device and --dtype are not used: the reference is always the CPU in float32")
        if args.json_path:
            write_json(Path(args.json_path), metadata)
        return 0
    report = verify.check_model(args.model, texts, device=args.device, dtype=args.dtype, spec=args.spec,
                                threshold=args.threshold, reference_path=args.reference, texts_file=args.texts)
    print(verify.format_report(report))
    if args.json_path:
        write_json(Path(args.json_path), report)
    return 0 if report["passed"] else 1


def _verify_reranker(args: argparse.Namespace) -> int:
    """A cross-encoder: its scores against stock's on the CPU in float32 (per-query Spearman, top-k, max error)."""
    from st_npu.evaluation import rerank
    from st_npu.loading.folder import resolve_model_path

    report = rerank.verify_reranker(str(resolve_model_path(args.model)), args.device, args.dtype)
    print(rerank.format_verify(report))
    if args.json_path:
        write_json(Path(args.json_path), report)
    return 0 if not report["failures"] else 1
