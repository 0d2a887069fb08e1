"""The reranker's accuracy check and benchmark (st_npu.evaluation.rerank): the metrics on known inputs, and the
checks on a tiny cross-encoder with random weights (on the emulated npu: plumbing, not Ascend numerics or speed)."""

from __future__ import annotations

import numpy as np
import pytest

from st_npu.evaluation import rerank
from st_npu.testing.fixtures import cross_encoder_folder


def test_compare_scores_finds_a_swapped_ranking_and_a_changed_top():
    reference = np.array([0.9, 0.5, 0.1, 0.8, 0.2, 0.3])
    same = rerank.compare_scores(reference, reference + 1e-7, per_query=3, k=1)
    assert same["failures"] == [] and same["spearman_min"] == pytest.approx(1.0) and same["max_abs_error"] < 1e-6
    swapped = reference.copy()
    swapped[[3, 5]] = swapped[[5, 3]]  # the second query's best document falls to last
    report = rerank.compare_scores(reference, swapped, per_query=3, k=1)
    assert report["spearman_min"] == pytest.approx(0.5) and report["top_k_agreement"] == 0.5
    assert len(report["failures"]) == 2


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("rerank") / "xlmr", "xlm-roberta")


def test_verify_and_bench_a_reranker_on_the_emulated_npu(reranker):
    workload = rerank.rerank_workload(queries=3, documents=5)
    report = rerank.verify_reranker(str(reranker), "npu:6", None, workload)
    assert report["failures"] == [] and report["max_abs_error"] <= 1e-5 and report["queries"] == 3
    assert "PASS" in rerank.format_verify(report)
    bench = rerank.bench_reranker(str(reranker), "npu:6", None, [4], workload=workload)
    assert [row["batch_size"] for row in bench["rows"]] == [4] and bench["rows"][0]["max_abs_error"] <= 1e-5
    assert "speed-up" in rerank.format_bench(bench)


def test_verify_and_bench_commands_take_a_reranker_folder(reranker):
    from conftest import run_cli

    emulated = {"ST_NPU_EMULATE": "2"}
    verified = run_cli("verify", "--model", str(reranker), "--device", "npu:1", env=emulated)
    assert verified.returncode == 0 and "Spearman per query" in verified.stdout and "PASS" in verified.stdout, \
        verified.stderr[-2000:]
    benched = run_cli("bench", "--model", str(reranker), "--device", "cpu", "--batch-sizes", "8", env=emulated)
    assert benched.returncode == 0 and "st_npu pairs/s" in benched.stdout, benched.stderr[-2000:]
