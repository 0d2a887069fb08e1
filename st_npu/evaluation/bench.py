"""``st-npu bench``: st_npu against stock sentence-transformers, same model, device and texts, in one process.

Both models are loaded on the device; stock always runs in float32 (its default, and the baseline the targets
name, e.g. "st_npu bf16 >= 4x stock fp32"), st_npu in ``--dtype``. For each batch size the timed passes
alternate, stock then st_npu, ``--repeats`` times, and each model's row reports its *best* pass (shortest
time): other work on the machine only ever slows a pass down, so the best pass is the least disturbed one.
Every pass's figures are in the ``--json`` file. The instruments (timers, memory, compile counts) are
:mod:`st_npu.evaluation.measure`'s; the table and plot are :mod:`st_npu.evaluation.report`'s.

* A pass is what a user runs: ``encode`` over the whole workload (``mixed``: the corpus in one call, so each
  model batches and sorts it its own way) or, for ``seed``, the seed port's method: ``SEED_CALLS`` calls of
  ``encode`` on the 23 sentences, each a single short batch. Throughput is texts (and real tokens, counted
  once with the model's tokenizer) over the pass's wall time; ``p50``/``p95`` latency are over its batches.
* Padding efficiency is real tokens over the tokens the forwards computed (rows x columns of the inputs).
* A row shows its model's lowest memory peak over the passes (both models share one heap): use ``--repeats 2``
  or more to compare CPU memory.
* Achieved FLOP/s = real tokens x 2 x (parameters of the transformer without embeddings and pooler) / time;
  attention's own FLOPs (4 x seq x hidden per token per layer) are ignored, which understates long texts by
  up to ~11 % for BERT-base at 512 tokens. It is shown as a share of the device's matmul peak in the row's
  dtype, measured once per dtype as the best of a few large square matmuls.
* Compilations (emulated npu only) are reset before each pass; a row shows its model's first pass at that
  batch size (later passes reuse its shapes).

Warm-up, untimed: st_npu with static shapes (the default on npu) first runs ``model.warmup(max batch size)``,
timed and reported on its own; then each model encodes one batch at each batch size. Stock therefore still
meets new shapes in its timed passes, and on Ascend each one compiles; the compile count shows it. Both
models share the device's compile cache, as they would in any one process, so stock's count is a lower bound.

Finally the embeddings of both models' last pass at each batch size are compared text by text; the command
fails (exit 1) when any text's cosine falls under ``MIN_COSINE`` or its centered cosine (see :func:`agreement`)
under ``MIN_CENTERED_COSINE``, so a fast but wrong st_npu cannot pass unnoticed.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from st_npu.evaluation import measure
from st_npu.errors import UsageError
from st_npu.evaluation.measure import compile_counter, matmul_peak_flops, memory_meter, percentile, synchronize
from st_npu.runtime.emulation import is_emulated

MODELS = ("stock", "st_npu")
STOCK_DTYPE = torch.float32
SEED_CALLS = 20  # one call of 23 short sentences lasts milliseconds on an accelerator: too short to time alone
MIN_COSINE = 0.99
MIN_CENTERED_COSINE = 0.9  # bf16 against fp32 scores ~0.995 on llm-embedder's shape; another text's row ~0


@dataclass(frozen=True)
class Workload:
    """The texts of one encode call, and how many calls make a pass."""

    name: str
    texts: list[str]
    calls: int = 1
    limit: int | None = None  # the --limit that cut it short


@dataclass
class PassResult:
    """One timed pass of one model at one batch size."""

    seconds: float
    latencies_s: list[float]
    computed_tokens: int
    compiles: int | None
    peak_memory_bytes: int | None
    embeddings: np.ndarray = field(repr=False)
    launches: dict[str, int] | None = None
    batches: int = 0


# --- workloads ---------------------------------------------------------------------------------------------


def load_workload(name: str, limit: int | None = None) -> Workload:
    from st_npu.evaluation.workloads import long_documents, mixed_corpus, seed_sentences, uniform_corpus

    if name == "seed":
        workload = Workload("seed", seed_sentences()[:limit], SEED_CALLS, limit)
    elif name == "long-document":
        workload = Workload(name, long_documents()[:limit], 1, limit)
    elif name == "uniform":
        workload = Workload(name, uniform_corpus()[:limit], 1, limit)
    else:
        workload = Workload("mixed", mixed_corpus(limit), 1, limit)
    if not workload.texts:
        raise UsageError(f"--limit {limit} leaves no texts of the {name} workload")
    return workload


def count_tokens(model: Any, texts: Sequence[str]) -> list[int]:
    """Each text's token count as the model sees it: default prompt included, truncated at max_seq_length."""
    prompt = model.prompts.get(model.default_prompt_name, "") if model.default_prompt_name else ""
    encoded = model.tokenizer([prompt + text for text in texts], truncation=True, max_length=model.max_seq_length)
    return [len(ids) for ids in encoded["input_ids"]]


def non_embedding_parameters(model: Any) -> int:
    """Parameters every token passes through: the transformer's, without its embedding tables and pooler."""
    transformer = getattr(model[0], "auto_model", model[0])
    return sum(parameter.numel() for name, parameter in transformer.named_parameters()
               if not name.startswith(("embeddings.", "pooler.")))


# --- measuring --------------------------------------------------------------------------------------------


def run_pass(model: Any, workload: Workload, batch_size: int, device: torch.device) -> PassResult:
    """One timed pass; the embeddings returned are those of its last encode call."""
    timer = measure.BatchTimer(model, device)
    meter = memory_meter(device)
    gc.collect()  # garbage of earlier passes, collected inside this one, would count in its time
    compiles = compile_counter(device)
    launches = measure.launch_counter(device)
    if meter is not None:
        meter.start()
    try:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(workload.calls):
            embeddings = model.encode(workload.texts, batch_size=batch_size, show_progress_bar=False,
                                      convert_to_numpy=True)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        peak = meter.stop() if meter is not None else None
        timer.remove()
    return PassResult(seconds, timer.latencies_s, timer.computed_tokens, compiles() if compiles else None, peak,
                      np.asarray(embeddings, dtype=np.float32), launches() if launches else None,
                      workload.calls * -(-len(workload.texts) // batch_size))


def summarize(passes: list[PassResult], texts: int, tokens: int, flops_per_token: int,
              peak_flops: float | None) -> dict[str, Any]:
    """A model's row at one batch size: its fastest pass's figures, compiles of its first pass, its lowest memory
    peak (what earlier passes leave in a shared heap only inflates one), and every pass's figures."""
    best = min(passes, key=lambda result: result.seconds)
    tokens_per_s = tokens / best.seconds
    flops = tokens_per_s * flops_per_token
    return {
        "seconds": best.seconds,
        "sentences_per_s": texts / best.seconds,
        "tokens_per_s": tokens_per_s,
        "latency_p50_ms": _ms(percentile(best.latencies_s, 50)),
        "latency_p95_ms": _ms(percentile(best.latencies_s, 95)),
        "batches": len(best.latencies_s),
        "padding_efficiency": tokens / best.computed_tokens if best.computed_tokens else None,
        "compiles": passes[0].compiles,  # the pass that meets the workload's shapes first; later ones reuse them
        # Batches that ran: the forwards the timer saw, or the replays where graphs replaced the forward.
        "launches_per_batch": (best.launches["launches"] / (len(best.latencies_s) or best.launches["replays"]
                                                            or best.batches) if best.launches else None),
        "replays": best.launches["replays"] if best.launches else None,
        "peak_memory_bytes": _lowest(p.peak_memory_bytes for p in passes),
        "flops_per_s": flops,
        "peak_share": flops / peak_flops if peak_flops else None,
        "passes": [{"seconds": p.seconds, "compiles": p.compiles, "peak_memory_bytes": p.peak_memory_bytes,
                    "computed_tokens": p.computed_tokens, "latencies_ms": [t * 1000 for t in p.latencies_s]}
                   for p in passes],
    }


def _lowest(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return min(known) if known else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def ratios(stock: dict[str, Any], ours: dict[str, Any]) -> dict[str, float | None]:
    """st_npu / stock for throughput, latency and memory (None where either side is missing or zero)."""
    keys = ("sentences_per_s", "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "peak_memory_bytes")
    return {key: ours[key] / stock[key] if ours[key] is not None and stock[key] else None for key in keys}


def agreement(stock: np.ndarray, ours: np.ndarray) -> dict[str, Any]:
    """How closely st_npu's embeddings match stock's, text by text.

    The plain cosine cannot catch rows that went to the wrong text: with random weights (the test fixtures)
    any two texts' embeddings can have a cosine above 0.9999. The centered cosine compares only what sets each
    text apart from the average text (stock's mean embedding is subtracted from both), so another text's row
    scores far lower, unless the two texts are alike to within the error, where no check could tell them apart.
    """
    from st_npu.evaluation.verify import cosines

    plain = cosines(stock, ours)
    # With one text the centered rows are zero: nothing to compare.
    mean = stock.astype(np.float64).mean(axis=0)
    centered = cosines(stock - mean, ours - mean) if len(stock) > 1 else np.ones(1)
    return {"min_cosine": float(plain.min()), "mean_cosine": float(plain.mean()),
            "min_centered_cosine": float(centered.min()),
            "max_abs_diff": float(np.abs(stock.astype(np.float64) - ours).max()),
            "passed": bool(plain.min() >= MIN_COSINE and centered.min() >= MIN_CENTERED_COSINE)}


# --- loading ----------------------------------------------------------------------------------------------


def load_models(model: str, device: str | None, dtype: str | None, spec: str | None = None,
                use_graphs: bool = True, max_batch_tokens: int | None = None) -> tuple[Any, Any, torch.device]:
    """Stock (float32) and st_npu (``dtype``) on the same folder and device."""
    import sentence_transformers

    from st_npu import SentenceTransformer
    from st_npu.loading.folder import resolve_model_path
    from st_npu.runtime.devices import resolve_device

    resolved = resolve_device(device)
    ours = SentenceTransformer(model, device=str(resolved), dtype=dtype, spec=spec, max_batch_tokens=max_batch_tokens)
    if not use_graphs:
        from dataclasses import replace

        from st_npu.engine import accelerate, engine_of

        accelerate(ours, replace(engine_of(ours).options, graphs=False))
    stock = sentence_transformers.SentenceTransformer(str(resolve_model_path(model)), device=str(resolved))
    stock.to(STOCK_DTYPE)  # a half-precision checkpoint may load in its own dtype
    return stock, ours, resolved


def dtype_of(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def warm_up_st_npu(model: Any, batch_size: int) -> dict[str, Any] | None:
    """st_npu's warm-up where static shapes are on (else there is nothing to pre-compile): shapes and seconds; on
    an accelerator also the peak memory of its eager encodes (every shape, the largest included) and, with graph
    mode, how many graphs it captured and the device memory they hold."""
    from st_npu.engine import engine_of

    engine = engine_of(model)
    if engine is None or engine.policy is None:
        return None
    meter = memory_meter(model.device) if model.device.type != "cpu" else None
    start = time.perf_counter()
    if meter is not None:
        meter.start()
    shapes = len(engine.compile_shapes(batch_size))  # the bench reports its time itself
    eager_peak = meter.stop() if meter is not None else None
    runner, graphs_held = engine.graphs, None
    if runner is not None:  # model.warmup's second step, measured on its own
        before = meter.allocated() if meter is not None else None
        engine.capture(batch_size)
        graphs_held = meter.allocated() - before if meter is not None else None
    synchronize(model.device)
    return {"batch_size": batch_size, "shapes": shapes, "seconds": time.perf_counter() - start,
            "eager_peak_bytes": eager_peak, "graphs": len(runner.graphs) if runner else 0,
            "graphs_bytes": graphs_held}


def warm_up(models: dict[str, Any], workload: Workload, batch_sizes: list[int]) -> dict[str, Any] | None:
    """st_npu's static-shape warm-up (reported), then one untimed batch per model and batch size."""
    warmup = warm_up_st_npu(models["st_npu"], max(batch_sizes))
    for batch_size in batch_sizes:
        for model in models.values():
            model.encode(workload.texts[:batch_size], batch_size=batch_size, show_progress_bar=False)
    return warmup


def timed_passes(models: dict[str, Any], workload: Workload, batch_size: int, repeats: int, device: torch.device,
                 progress: Any) -> dict[str, list[PassResult]]:
    """``repeats`` rounds of one pass per model, in turn, so that drifts in machine load hit both alike."""
    passes: dict[str, list[PassResult]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            progress.set_description(f"batch {batch_size} {name}")
            passes[name].append(run_pass(model, workload, batch_size, device))
            progress.update()
    return passes


# --- the whole run --------------------------------------------------------------------------------------


def benchmark(model: str, workload: Workload, batch_sizes: Sequence[int], *, device: str | None = None,
              dtype: str | None = None, spec: str | None = None, repeats: int = 1,
              use_graphs: bool = True, max_batch_tokens: int | None = None) -> dict[str, Any]:
    """What ``st-npu bench`` runs: both models over ``workload`` at each batch size; the report as plain data,
    whose ``agreement_passed`` says whether st_npu agreed with stock at every batch size."""
    stock, ours, resolved = load_models(model, device, dtype, spec, use_graphs, max_batch_tokens)
    models = {"stock": stock, "st_npu": ours}
    dtypes = {name: dtype_of(model) for name, model in models.items()}
    tokens = sum(count_tokens(stock, workload.texts)) * workload.calls
    texts = len(workload.texts) * workload.calls
    peaks = {dtype: matmul_peak_flops(resolved, dtype, measure.PEAK_MATMUL_SIZE) for dtype in set(dtypes.values())}
    flops_per_token = 2 * non_embedding_parameters(stock)

    warmup = warm_up(models, workload, list(batch_sizes))

    rows, checks = [], []
    with _progress(len(batch_sizes) * repeats * len(models)) as progress:
        for batch_size in batch_sizes:
            passes = timed_passes(models, workload, batch_size, repeats, resolved, progress)
            summary = {name: summarize(passes[name], texts, tokens, flops_per_token, peaks[dtypes[name]])
                       for name in models}
            for name in models:
                rows.append({"batch_size": batch_size, "model": name, "dtype": _name(dtypes[name]), **summary[name],
                             "ratio": ratios(summary["stock"], summary[name]) if name == "st_npu" else None})
            checks.append({"batch_size": batch_size,
                           **agreement(passes["stock"][-1].embeddings, passes["st_npu"][-1].embeddings)})

    return {"model_name": model_name(model, ours.model_spec),
            **_report(model, resolved, dtypes, workload, texts, tokens, peaks, flops_per_token, warmup, repeats,
                      rows, checks)}


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pass", desc="bench", file=sys.stderr)


def model_name(model: str, spec: dict[str, Any] | None) -> str:
    """What a reader calls the model: its known name, its hub id, or a local folder's last two path parts
    (sentence-transformers folders are often called just ``model``)."""
    if spec:
        return spec["name"]
    path = Path(model)
    return "/".join(path.resolve().parts[-2:]) if path.exists() else model


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _report(model: str, device: torch.device, dtypes: dict[str, torch.dtype], workload: Workload, texts: int,
            tokens: int, peaks: dict[torch.dtype, float], flops_per_token: int, warmup: dict[str, Any] | None,
            repeats: int, rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> dict[str, Any]:
    from st_npu.runtime.devices import cpu_bf16_units, cpu_name
    from st_npu.evaluation.verify import versions

    return {
        "model": model,
        "cpu": {"name": cpu_name(), "bf16_units": cpu_bf16_units()},
        "device": str(device),
        "emulated": is_emulated(device),
        "threads": torch.get_num_threads(),
        "dtypes": {name: _name(dtype) for name, dtype in dtypes.items()},
        "workload": {"name": workload.name, "texts_per_call": len(workload.texts), "calls_per_pass": workload.calls,
                     "texts_per_pass": texts, "tokens_per_pass": tokens, "limit": workload.limit},
        "repeats": repeats,
        "pass_chosen": "best (shortest time)",
        "matmul_peak_flops": {_name(dtype): flops for dtype, flops in peaks.items()},
        "matmul_peak_size": measure.PEAK_MATMUL_SIZE,
        "flops_per_token": flops_per_token,
        "warmup": warmup,
        "rows": rows,
        "agreement": checks,
        "min_cosine_required": MIN_COSINE,
        "min_centered_cosine_required": MIN_CENTERED_COSINE,
        "agreement_passed": all(check["passed"] for check in checks),
        "versions": versions(),
    }
