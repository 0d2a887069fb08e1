"""What ``st-npu bench`` prints and draws: the table, the report around it, and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from st_npu.errors import UsageError
from st_npu.evaluation.measure import PEAK_MATMUL_REPEATS
from st_npu.files.outputs import atomic_file

PLOT_HINT = 'pip install "st-npu[bench]"'


COLUMNS = (("batch", 6), ("model", 8), ("dtype", 10), ("sent/s", 10), ("tok/s", 11), ("p50 ms", 9), ("p95 ms", 9),
           ("pad eff", 8), ("compiles", 9), ("launch/b", 9), ("replays", 8), ("peak MiB", 10), ("% peak", 8), ("speed x", 8), ("mem x", 6))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (batch size, model); the ``x`` columns are st_npu / stock at that batch size."""
    lines = ["".join(f"{title:<{width}}" for title, width in COLUMNS).rstrip()]
    for row in rows:
        ratio = row.get("ratio") or {}
        memory = row["peak_memory_bytes"]
        cells = (row["batch_size"], row["model"], row["dtype"], _number(row["sentences_per_s"], ".1f"),
                 _number(row["tokens_per_s"], ",.0f"), _number(row["latency_p50_ms"], ".1f"),
                 _number(row["latency_p95_ms"], ".1f"), _number(row["padding_efficiency"], ".2f"),
                 _number(row["compiles"], "d"), _number(row.get("launches_per_batch"), ".1f"),
                 _number(row.get("replays"), "d"), _number(None if memory is None else memory / 2**20, ",.1f"),
                 _number(None if row["peak_share"] is None else row["peak_share"] * 100, ".1f"),
                 _number(ratio.get("sentences_per_s"), ".2f", "x"), _number(ratio.get("peak_memory_bytes"), ".2f", "x"))
        lines.append("".join(f"{cell!s:<{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True)).rstrip())
    return "\n".join(lines)


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def cpu_line(cpu: dict[str, Any]) -> str:
    """The CPU and its bf16 units: a bf16 figure reads right only beside them (without, torch emulates bf16)."""
    return f"{cpu['name']}; bf16 units: {cpu['bf16_units'] or 'none (bf16 emulated)'}"


def format_report(report: dict[str, Any]) -> str:
    workload, dtypes, warmup = report["workload"], report["dtypes"], report["warmup"]
    calls = f" x {workload['calls_per_pass']} calls" if workload["calls_per_pass"] > 1 else ""
    peaks = ", ".join(f"{dtype} {flops / 1e9:,.1f} GFLOP/s" for dtype, flops in report["matmul_peak_flops"].items())
    size = report["matmul_peak_size"]
    emulated = " (emulated: compile counts are real; times and memory are the CPU behind it)"
    warmed = (f"st_npu compiled {warmup['shapes']} static shapes for batch {warmup['batch_size']} in "
              f"{warmup['seconds']:.1f} s (not in the times)" if warmup else
              "one untimed batch per model and batch size (st_npu static shapes are off here)")
    if warmup and warmup.get("graphs_bytes") is not None and warmup["eager_peak_bytes"]:
        held, eager = warmup["graphs_bytes"], warmup["eager_peak_bytes"]
        warmed += (f"\n              captured {warmup['graphs']} graphs holding {held / 2**20:,.1f} MiB, "
                   f"{held / eager:.2f}x the peak of its eager encodes ({eager / 2**20:,.1f} MiB)")
    lines = [
        f"st-npu bench: {report['model_name']} ({report['model']}) on {report['device']}"
        + (emulated if report["emulated"] else ""),
        f"  models      stock {dtypes['stock']} vs st_npu {dtypes['st_npu']}, {report['threads']} CPU threads",
        f"  cpu         {cpu_line(report['cpu'])}",
        f"  workload    {workload['name']}: {workload['texts_per_call']} texts{calls}, "
        + f"{workload['tokens_per_pass']:,} real tokens per pass",
        f"  passes      {report['repeats']} per model and batch size, alternating; rows show the fastest pass, "
        + "the first's compiles, the lowest peak memory",
        "  latency     forward of one batch (first module in to last module out, synchronized)",
        f"  FLOP/s      real tokens x {report['flops_per_token']:,} (2 x non-embedding parameters) / time; "
        + "attention's own FLOPs ignored",
        f"  matmul peak {peaks} ({size}x{size}, best of {PEAK_MATMUL_REPEATS})",
        f"  warm-up     {warmed}",
        "",
        format_table(report["rows"]),
        "",
    ]
    for check in report["agreement"]:
        verdict = "ok" if check["passed"] else (f"FAIL: needs cosine >= {report['min_cosine_required']} and "
                                                f"centered cosine >= {report['min_centered_cosine_required']} "
                                                f"for every text")
        lines.append(f"  agreement at batch {check['batch_size']}: cosine min {check['min_cosine']:.6f} mean "
                     f"{check['mean_cosine']:.6f}, centered min {check['min_centered_cosine']:.6f}, max |diff| "
                     f"{check['max_abs_diff']:.2e}  {verdict}")
    installed = ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version)
    lines.append(f"  versions    {installed}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Draw the report (see :func:`draw`) to a PNG file."""
    figure = draw(report)
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png")


def draw(report: dict[str, Any]) -> Any:
    """A matplotlib figure of three panels against batch size: sentences/s of both models, st_npu's speed-up, and
    batch latency p50/p95; its title names the CPU and its bf16 units."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {PLOT_HINT}") from None
    by_model = {name: [row for row in report["rows"] if row["model"] == name] for name in report["dtypes"]}
    sizes = sorted({row["batch_size"] for row in report["rows"]})
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    throughput, speedup, latency = figure.subplots(1, 3)
    for name, rows in by_model.items():
        label = f"{name} ({report['dtypes'][name]})"
        throughput.plot([r["batch_size"] for r in rows], [r["sentences_per_s"] for r in rows], marker="o", label=label)
        line, = latency.plot([r["batch_size"] for r in rows], [r["latency_p50_ms"] for r in rows], marker="o",
                             label=f"{label} p50")
        latency.plot([r["batch_size"] for r in rows], [r["latency_p95_ms"] for r in rows], marker="^",
                     linestyle="--", color=line.get_color(), label=f"{label} p95")
    ratios = [(r["batch_size"], r["ratio"]["sentences_per_s"]) for r in by_model["st_npu"] if r["ratio"]]
    bars = speedup.bar([str(size) for size, _ in ratios], [ratio or 0 for _, ratio in ratios], color="tab:orange")
    speedup.bar_label(bars, labels=[f"{ratio:.2f}x" if ratio else "-" for _, ratio in ratios])
    speedup.axhline(1.0, color="grey", linewidth=1)
    for axes, ylabel, title in ((throughput, "sentences / s", "throughput"),
                                (speedup, "st_npu / stock", "speed-up (same run)"),
                                (latency, "ms per batch (forward)", "batch latency")):
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.set_xlabel("batch size")
        axes.set_ylim(bottom=0)  # ratios read true only from a zero baseline
        axes.grid(True, alpha=0.3)
    for axes in (throughput, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.legend(fontsize="small")
    device = f"{report['device']} (emulated npu: CPU times, not Ascend's)" if report["emulated"] else report["device"]
    figure.suptitle(f"{report['model_name']} on {device}: st_npu {report['dtypes']['st_npu']} vs stock "
                    f"{report['dtypes']['stock']}, {report['workload']['name']} workload\n{cpu_line(report['cpu'])}")
    return figure
