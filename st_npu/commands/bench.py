"""``st-npu bench``: st_npu against stock sentence-transformers, side by side."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from st_npu.commands.options import (add_budget_argument, add_model_arguments, check_device, check_output_folder,
                                     positive_int, write_json)
from st_npu.errors import UsageError

HELP = "st_npu against stock sentence-transformers, side by side"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated (default 1,8,32,128)")
    parser.add_argument("--workload", choices=("seed", "mixed", "long-document", "uniform"), default="mixed",
                        help="seed: the 23 sentences of the seed port; mixed: zh/en texts of 1 to 512 tokens; "
                             "long-document: 96 English texts of 10 to 8,000 tokens (cut at the model's limit); "
                             "uniform: 256 English texts of about 128 tokens")
    parser.add_argument("--limit", type=positive_int, help="use only the first N texts of the workload")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed passes per batch size and model")
    parser.add_argument("--graphs", choices=("on", "off"), default="on",
                        help="st_npu's graph mode where the device can capture (default on; emulated npu, Ascend, "
                             "CUDA)")
    add_budget_argument(parser)
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="draw throughput, speed-up and latency against batch size to this PNG "
                                       "(needs matplotlib)")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (sorted, without repeats); anything else is a usage error naming the value."""
    sizes = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise UsageError(f"--batch-sizes {text}: {item!r} is not a positive integer (use e.g. 1,8,32,128)")
        sizes.add(int(item))
    return sorted(sizes)


def run(args: argparse.Namespace) -> int:
    """0 when st_npu agrees with stock at every batch size, 1 when it does not."""
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    check_output_folder("--json", args.json_path)
    check_output_folder("--plot", args.plot)
    check_device(args.device)
    from st_npu.evaluation import bench, report

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot needs matplotlib: {report.PLOT_HINT}")
    from st_npu.loading.folder import is_reranker, resolve_model_path

    folder = resolve_model_path(args.model)
    if is_reranker(folder):  # a cross-encoder: pairs per second against stock CrossEncoder
        from st_npu.evaluation import rerank

        results = rerank.bench_reranker(str(folder), args.device, args.dtype, batch_sizes, args.repeats)
        print(rerank.format_bench(results))
        if args.json_path:
            write_json(Path(args.json_path), results)
        return 0
    workload = bench.load_workload(args.workload, args.limit)
    results = bench.benchmark(args.model, workload, batch_sizes, device=args.device, dtype=args.dtype, spec=args.spec,
                              repeats=args.repeats, use_graphs=args.graphs == "on",
                              max_batch_tokens=args.max_batch_tokens)
    print(report.format_report(results))
    if args.json_path:
        write_json(Path(args.json_path), results)
    if args.plot:
        report.plot(results, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0 if results["agreement_passed"] else 1
