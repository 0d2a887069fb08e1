"""st-npu bench: the command end to end on the CPU and the emulated npu, and its measuring pieces."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time

import numpy as np
import pytest
from conftest import needs_emulator

from st_npu import cli
from st_npu.commands import bench as bench_command
from st_npu.evaluation import bench, measure
from st_npu.evaluation import report as bench_report
from st_npu.runtime.devices import cpu_bf16_units

BATCH_SIZES = (4, 8)
LIMIT = 24


def bench_cli(*args: str) -> tuple[int, str]:
    """``st-npu bench`` in this process (the emulator is installed here); returns the exit code and stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["bench", *map(str, args)])
    return code, stdout.getvalue()


@pytest.fixture(autouse=True)
def small_peak_matmul(monkeypatch):
    monkeypatch.setattr(measure, "PEAK_MATMUL_SIZE", 128)


@pytest.fixture(scope="module")
def cpu_run(tiny_cls, tmp_path_factory):
    """One CPU run at two batch sizes: (exit code, stdout, JSON report, plot path or None)."""
    folder = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "PEAK_MATMUL_SIZE", 128)
        plot = folder / "plot.png" if importlib.util.find_spec("matplotlib") else None
        code, out = bench_cli("--model", tiny_cls, "--device", "cpu", "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
                              "--limit", LIMIT, "--repeats", 2, "--json", folder / "report.json",
                              *(("--plot", plot) if plot else ()))
    return code, out, json.loads((folder / "report.json").read_text(encoding="utf-8")), plot


def rows_of(report: dict) -> dict[tuple[int, str], dict]:
    return {(row["batch_size"], row["model"]): row for row in report["rows"]}


# --- end to end -------------------------------------------------------------------------------------------


def test_cpu_rows_ratios_and_agreement(cpu_run):
    code, out, report, _ = cpu_run
    assert code == 0
    rows = rows_of(report)
    assert set(rows) == {(size, model) for size in BATCH_SIZES for model in bench.MODELS}
    for size in BATCH_SIZES:
        stock, ours = rows[size, "stock"], rows[size, "st_npu"]
        for row in (stock, ours):
            assert row["sentences_per_s"] > 0 and row["tokens_per_s"] > 0
            assert row["sentences_per_s"] == pytest.approx(LIMIT / row["seconds"])
            assert row["seconds"] == min(p["seconds"] for p in row["passes"]) and len(row["passes"]) == 2
            # st_npu runs each sequence bucket as its own group: never fewer batches than stock
            assert row["batches"] == -(-LIMIT // size) if row is stock else row["batches"] >= -(-LIMIT // size)
            assert 0 < row["padding_efficiency"] <= 1
            assert row["compiles"] is None  # nothing counts compilations on the CPU
            assert row["peak_memory_bytes"] == min(p["peak_memory_bytes"] for p in row["passes"])
        assert ours["ratio"]["sentences_per_s"] == pytest.approx(ours["sentences_per_s"] / stock["sentences_per_s"])
        assert stock["ratio"] is None
    assert report["dtypes"] == {"stock": "float32", "st_npu": "float32"}
    assert report["workload"]["texts_per_pass"] == LIMIT and report["workload"]["tokens_per_pass"] > LIMIT
    assert [check["batch_size"] for check in report["agreement"]] == list(BATCH_SIZES)
    assert report["agreement_passed"] and all(check["min_cosine"] > 0.9999 for check in report["agreement"])
    assert "stock float32 vs st_npu float32" in out and out.count("agreement at batch") == len(BATCH_SIZES)


def test_plot_is_a_png(cpu_run):
    plot = cpu_run[3]
    if plot is None:
        pytest.skip(f"matplotlib is not installed ({bench_report.PLOT_HINT})")
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_cpu_and_its_bf16_units_are_in_the_output_and_the_plot_title(cpu_run):
    _, out, report, plot = cpu_run
    units = report["cpu"]["bf16_units"]
    line = f"{report['cpu']['name']}; bf16 units: {units or 'none (bf16 emulated)'}"
    assert units == cpu_bf16_units() and f"  cpu         {line}\n" in out
    if plot is None:
        pytest.skip(f"matplotlib is not installed ({bench_report.PLOT_HINT})")
    assert bench_report.draw(report).get_suptitle().splitlines()[-1] == line


@needs_emulator
def test_emulated_npu_st_npu_compiles_nothing_after_warmup(tiny_cls, tmp_path):
    code, out = bench_cli("--model", tiny_cls, "--device", "npu:1", "--workload", "mixed", "--batch-sizes", "4,8",
                          "--limit", 40, "--json", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert code == 0 and report["emulated"] and report["device"] == "npu:1"
    warmup = report["warmup"]
    assert warmup["shapes"] > 0 and warmup["graphs"] == warmup["shapes"]
    assert 0 < warmup["graphs_bytes"] <= 1.5 * warmup["eager_peak_bytes"]
    rows = rows_of(report)
    for size in (4, 8):
        assert rows[size, "st_npu"]["compiles"] == 0 and rows[size, "st_npu"]["launches_per_batch"] == 3
        assert rows[size, "stock"]["compiles"] > 0
    assert "emulated" in out and f"captured {warmup['graphs']} graphs holding" in out


def test_a_wrong_st_npu_fails_the_run(tiny_cls, monkeypatch):
    load = bench.load_models

    def reversed_rows(*args, **kwargs):
        stock, ours, device = load(*args, **kwargs)
        encode = ours.encode
        monkeypatch.setattr(ours, "encode", lambda *a, **k: encode(*a, **k)[::-1])
        return stock, ours, device

    monkeypatch.setattr(bench, "load_models", reversed_rows)
    code, out = bench_cli("--model", tiny_cls, "--device", "cpu", "--batch-sizes", "8", "--limit", 12)
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("sizes, bad", [("8,x", "'x'"), ("0", "'0'"), ("4,,8", "''")])
def test_bad_batch_sizes_exit_2_naming_the_value(sizes, bad, capsys):
    assert cli.main(["bench", "--model", "unused", "--batch-sizes", sizes]) == 2
    error = capsys.readouterr().err
    assert f"--batch-sizes {sizes}" in error and bad in error and "positive integer" in error


def test_plot_without_matplotlib_exits_2_with_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    assert cli.main(["bench", "--model", "unused", "--plot", str(tmp_path / "p.png")]) == 2
    assert bench_report.PLOT_HINT in capsys.readouterr().err


# --- the pieces -------------------------------------------------------------------------------------------


def test_parse_batch_sizes_sorts_and_drops_repeats():
    assert bench_command.parse_batch_sizes("32, 8,1,8") == [1, 8, 32]


def test_seed_workload_repeats_the_sentences():
    workload = bench.load_workload("seed", limit=5)
    assert len(workload.texts) == 5 and workload.calls == bench.SEED_CALLS


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")
def test_rss_sampler_catches_a_peak_freed_before_stop():
    sampler = measure.RssSampler()
    sampler.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page written
    time.sleep(0.1)
    del block
    increase = sampler.stop()
    assert 56 * 2**20 < increase < 256 * 2**20


def test_agreement_flags_a_mismatch():
    stock = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    assert bench.agreement(stock, stock.copy())["passed"]
    wrong = bench.agreement(stock, stock[::-1])
    assert not wrong["passed"] and wrong["min_cosine"] < bench.MIN_COSINE and wrong["max_abs_diff"] > 0


def test_agreement_catches_swapped_rows_that_cosine_misses():
    """Random-weight models embed every text almost alike: only the centered cosine sees two rows swapped."""
    rng = np.random.default_rng(1)
    stock = (np.ones(16) + 1e-3 * rng.standard_normal((6, 16))).astype(np.float32)
    noisy = stock + 1e-6 * rng.standard_normal((6, 16)).astype(np.float32)
    assert bench.agreement(stock, noisy)["passed"]
    swapped = bench.agreement(stock, noisy[[1, 0, 2, 3, 4, 5]])
    assert swapped["min_cosine"] > 0.999 and swapped["min_centered_cosine"] < bench.MIN_CENTERED_COSINE
    assert not swapped["passed"]


def test_format_table_one_line_per_row_with_ratios():
    base = {"dtype": "float32", "tokens_per_s": 12345.6, "latency_p50_ms": 1.25, "latency_p95_ms": 2.5,
            "padding_efficiency": 0.8, "compiles": None, "peak_memory_bytes": 3 * 2**20, "peak_share": 0.123}
    rows = [{**base, "batch_size": 32, "model": "stock", "sentences_per_s": 100.0, "ratio": None},
            {**base, "batch_size": 32, "model": "st_npu", "dtype": "bfloat16", "sentences_per_s": 412.0,
             "compiles": 0, "launches_per_batch": 4.0, "replays": 3,
             "ratio": {"sentences_per_s": 4.12, "peak_memory_bytes": 0.5}}]
    header, stock, ours = bench_report.format_table(rows).splitlines()
    assert header.split()[:4] == ["batch", "model", "dtype", "sent/s"] and "speed x" in header
    assert stock.split() == ["32", "stock", "float32", "100.0", "12,346", "1.2", "2.5", "0.80", "-", "-", "-", "3.0",
                             "12.3", "-", "-"]
    assert ours.split()[-4:] == ["3.0", "12.3", "4.12x", "0.50x"] and ours.split()[8:11] == ["0", "4.0", "3"]
