"""A reranker on the device against the CPU float32 reference, and against stock ``CrossEncoder`` for speed.

Accuracy (``verify_reranker``): each query's candidate documents are scored on the target and on the CPU in float32;
the report gives the largest absolute score difference, the Spearman correlation of each query's two rankings (the
lowest and the mean) and how many queries keep the same top-k documents. It passes when every query's ranking
correlates at least ``min_spearman`` and the top-k sets agree. Speed (``bench_reranker``): stock ``CrossEncoder`` and
``st_npu.CrossEncoder`` on the same pairs, device and batch sizes, alternating, pairs per second and their ratio.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from st_npu.evaluation.workloads import mixed_corpus, seed_sentences

MIN_SPEARMAN = 0.99
TOP_K = 3


def rerank_workload(queries: int = 8, documents: int = 16) -> list[tuple[str, list[str]]]:
    """Deterministic queries (the seed sentences) with candidate documents from the mixed corpus."""
    corpus = mixed_corpus(queries * documents)
    return [(query, corpus[index * documents:(index + 1) * documents])
            for index, query in enumerate(seed_sentences()[:queries])]


def pairs_of(workload: Sequence[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    return [(query, document) for query, documents in workload for document in documents]


def compare_scores(reference: np.ndarray, target: np.ndarray, per_query: int, k: int = TOP_K,
                   min_spearman: float = MIN_SPEARMAN) -> dict[str, Any]:
    """Scores of consecutive groups of ``per_query`` pairs (one query each), target against reference."""
    from scipy.stats import spearmanr

    reference, target = np.asarray(reference, np.float64), np.asarray(target, np.float64)
    groups = [slice(start, start + per_query) for start in range(0, len(reference), per_query)]
    spearman = [float(spearmanr(reference[group], target[group]).statistic) for group in groups]
    same_top = [set(np.argsort(-reference[group])[:k]) == set(np.argsort(-target[group])[:k]) for group in groups]
    report = {"pairs": len(reference), "queries": len(groups), "max_abs_error": float(np.abs(reference - target).max()),
              "spearman_min": min(spearman), "spearman_mean": float(np.mean(spearman)), "top_k": k,
              "top_k_agreement": sum(same_top) / len(groups)}
    report["failures"] = [text for text, failed in (
        (f"a query's ranking correlates {report['spearman_min']:.4f} < {min_spearman}", report["spearman_min"] < min_spearman),
        (f"top-{k} differs for {len(groups) - sum(same_top)} of {len(groups)} queries", not all(same_top)),
    ) if failed]
    return report


def verify_reranker(model_name_or_path: str, device: str | None, dtype: str | None,
                    workload: Sequence[tuple[str, list[str]]] | None = None) -> dict[str, Any]:
    """The target (``st_npu.CrossEncoder`` on ``device`` in ``dtype``) against stock on the CPU in float32."""
    import sentence_transformers

    from st_npu.cross_encoder import CrossEncoder

    workload = workload or rerank_workload()
    pairs = pairs_of(workload)
    model = CrossEncoder(model_name_or_path, device=device, dtype=dtype)
    stock = _same_template(sentence_transformers.CrossEncoder(str(model_name_or_path), device="cpu"), model)
    reference = stock.predict(pairs, show_progress_bar=False)
    target = model.predict(pairs, show_progress_bar=False)
    return {"model": str(model_name_or_path), "device": str(model.device), "dtype": str(dtype or "float32"),
            **compare_scores(reference, target, len(workload[0][1]))}


def _same_template(stock: Any, ours: Any) -> Any:
    """Stock given the chat template st_npu gave a known reranker (Qwen3-Reranker's prompt template), so that both
    score the same inputs."""
    template = getattr(ours.tokenizer, "chat_template", None)
    if template is not None and template != getattr(stock.tokenizer, "chat_template", None):
        stock.tokenizer.chat_template = template
    return stock


def bench_reranker(model_name_or_path: str, device: str | None, dtype: str | None, batch_sizes: Sequence[int],
                   repeats: int = 1, workload: Sequence[tuple[str, list[str]]] | None = None) -> dict[str, Any]:
    """Pairs per second of stock ``CrossEncoder`` (float32) and ``st_npu.CrossEncoder`` (``dtype``) on the same
    pairs and device, each batch size timed alternately, after one untimed pass each (and st_npu's warm-up)."""
    import sentence_transformers

    from st_npu.cross_encoder import CrossEncoder
    from st_npu.engine import engine_of

    pairs = pairs_of(workload or rerank_workload())
    ours = CrossEncoder(model_name_or_path, device=device, dtype=dtype)
    stock = _same_template(sentence_transformers.CrossEncoder(str(model_name_or_path), device=str(ours.device)), ours)
    engine = engine_of(ours)
    if engine is not None and engine.policy is not None:
        engine.warmup(max(batch_sizes), show_progress_bar=False)
    rows = []
    for batch_size in batch_sizes:
        seconds = {"stock": 0.0, "st_npu": 0.0}
        scores = {}
        for model in (stock, ours):
            model.predict(pairs[:batch_size], batch_size=batch_size, show_progress_bar=False)
        for _ in range(repeats):
            for name, model in (("stock", stock), ("st_npu", ours)):
                start = time.perf_counter()
                scores[name] = model.predict(pairs, batch_size=batch_size, show_progress_bar=False)
                seconds[name] += time.perf_counter() - start
        rate = {name: len(pairs) * repeats / value for name, value in seconds.items()}
        rows.append({"batch_size": batch_size, "stock_pairs_per_s": rate["stock"], "st_npu_pairs_per_s": rate["st_npu"],
                     "speedup": rate["st_npu"] / rate["stock"],
                     "max_abs_error": float(np.abs(scores["stock"] - scores["st_npu"]).max())})
    return {"model": str(model_name_or_path), "device": str(ours.device), "pairs": len(pairs), "rows": rows}


def format_verify(report: dict[str, Any]) -> str:
    lines = [f"reranker {report['model']} on {report['device']} ({report['dtype']}) vs CPU float32, "
             f"{report['queries']} queries x {report['pairs'] // report['queries']} documents",
             f"  max |score difference|   {report['max_abs_error']:.3g}",
             f"  Spearman per query       min {report['spearman_min']:.4f}, mean {report['spearman_mean']:.4f}",
             f"  same top-{report['top_k']} documents    {report['top_k_agreement']:.0%} of queries"]
    lines += [f"  FAIL: {failure}" for failure in report["failures"]] or ["  PASS"]
    return "\n".join(lines)


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"reranker {report['model']} on {report['device']}, {report['pairs']} pairs",
             f"  {'batch':>5}  {'stock pairs/s':>13}  {'st_npu pairs/s':>14}  {'speed-up':>8}  {'max |diff|':>10}"]
    lines += [f"  {row['batch_size']:>5}  {row['stock_pairs_per_s']:>13.1f}  {row['st_npu_pairs_per_s']:>14.1f}  "
              f"{row['speedup']:>7.2f}x  {row['max_abs_error']:>10.2g}" for row in report["rows"]]
    return "\n".join(lines)
