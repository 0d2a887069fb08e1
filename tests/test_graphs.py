"""Graph mode (st_npu.engine.graphs), the emulated npu's graphs, and SDPA masks that reach the fused kernel.

On the emulated npu these tests prove what is captured, replayed, counted and copied; not Ascend's graph runtime,
its kernels or speed. ``test_graphs_on_ascend`` runs on hardware with ST_NPU_TEST_DEVICE=npu.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from st_npu.engine import Options, ShapePolicy, accelerate, attention, context, engine_of
from st_npu.engine.static_shapes import Tails
from st_npu.emulator import backend as emulator
from st_npu.evaluation.workloads import mixed_corpus, seed_sentences

POLICY = ShapePolicy(seq_lengths=(16, 64), batch_sizes=(1, 8))
TEXTS = [text for text in mixed_corpus(40) if len(text) < 150][:12]


def _model(folder, device, **kwargs):
    model = st_npu.SentenceTransformer(folder, device=device, static_shapes=POLICY, **kwargs)
    model.warmup(batch_size=8)
    return model


@needs_emulator
def test_capture_records_launches_without_computing_and_replay_runs_them():
    x = torch.zeros(2, 3, device="npu:0")
    graph = torch.npu.NPUGraph()
    with torch.npu.graph(graph):
        y = (x + 1) * 2
    assert torch.isnan(y.cpu()).all()  # garbage until the first replay, as on hardware
    x.copy_(torch.ones(2, 3))
    emulator.reset_stats()
    graph.replay()
    assert emulator.stats()["per_device"][0]["launches"] == 1 and emulator.stats()["replays"] == 1
    assert torch.equal(y.cpu(), torch.full((2, 3), 4.0))


@needs_emulator
def test_capture_records_only_its_own_thread_and_each_thread_has_its_current_device():
    x = torch.ones(4, device="npu:2")
    seen = {}

    def other_thread():
        seen["device"] = torch.npu.current_device()  # a new thread starts on npu:0, as in torch_npu
        seen["capturing"] = torch.npu.is_current_stream_capturing()
        seen["sum"] = (x + 1).sum().item()  # a host sync, refused only in the capturing thread

    graph = torch.npu.NPUGraph()
    with torch.npu.device(2), torch.npu.graph(graph, capture_error_mode="thread_local"):
        y = x * 3
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == {"device": 0, "capturing": False, "sum": 8.0}
    emulator.reset_stats()
    graph.replay()
    assert emulator.stats()["per_device"][2]["launches"] == 1  # the other thread's work was not recorded
    assert torch.equal(y.cpu(), torch.full((4,), 3.0))


@needs_emulator
def test_a_shared_pool_reuses_what_a_capture_freed_not_what_a_graph_still_holds():
    x = torch.zeros(1024, device="npu:1")  # 4 KiB
    pool, kept = torch.npu.graph_pool_handle(), []
    before = torch.npu.memory_allocated(1)
    with torch.npu.device(1):  # capture records the current device's work
        for keep in (True, False, False):
            with torch.npu.graph(torch.npu.NPUGraph(), pool=pool):
                y = x * 2
            if keep:
                kept.append(y)
            del y
    # The first graph's output stays taken; the second's, dropped, serves the third capture.
    assert torch.npu.memory_allocated(1) - before == 2 * 4096


@needs_emulator
@pytest.mark.parametrize("sync", [lambda x: x.sum().item(), lambda x: x.cpu(), lambda x: x.nonzero(),
                                  lambda x: x.to("npu:1")])
def test_capture_refuses_a_host_sync(sync):
    x = torch.ones(4, device="npu:0")
    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            sync(x)
    assert not torch.npu.is_current_stream_capturing()


@needs_emulator
def test_graph_mode_replays_one_graph_per_batch_with_eager_and_stock_results(tiny_cls):
    model = _model(tiny_cls, "npu:1")
    assert len(engine_of(model).graphs.graphs) == len(POLICY.for_model(model.max_seq_length).shapes(8))
    emulator.reset_stats()
    got = model.encode(TEXTS, batch_size=8)
    counts = emulator.stats()["per_device"][1]
    batches = -(-len(TEXTS) // 8)
    # Every batch (bucket groups may add batches) is one copy in, one replay, one copy out; nothing compiles.
    assert counts["replays"] >= batches and counts["launches"] == 3 * counts["replays"]
    assert counts["compiles"] == 0 and counts["sdpa_unfused"] == 0
    eager = st_npu.SentenceTransformer(tiny_cls, device="npu:2", static_shapes=POLICY, graphs=False)
    emulator.reset_stats()
    expected = eager.encode(TEXTS, batch_size=8)
    assert emulator.stats()["per_device"][2]["launches"] > 5 * counts["launches"]
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:2").encode(TEXTS, batch_size=8)
    assert np.abs(got - expected).max() <= 1e-6 and np.abs(got - stock).max() <= 1e-6


@needs_emulator
def test_replay_outputs_are_not_aliased_across_calls(tiny_cls):
    model = _model(tiny_cls, "npu:3")
    first = model.encode(TEXTS[:5], batch_size=8, convert_to_tensor=True)
    kept = first.cpu().clone()
    tokens = model.encode(TEXTS[:5], batch_size=8, output_value="token_embeddings")
    kept_tokens = [t.cpu().clone() for t in tokens]
    model.encode(TEXTS[5:], batch_size=8, convert_to_tensor=True)
    model.encode(TEXTS[5:], batch_size=8, output_value="token_embeddings")
    assert torch.equal(first.cpu(), kept)
    assert all(torch.equal(t.cpu(), k) for t, k in zip(tokens, kept_tokens))


@needs_emulator
def test_a_capture_that_fails_falls_back_to_eager_with_one_warning(tiny_cls, caplog):
    reference = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(TEXTS, batch_size=8)
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:4", static_shapes=POLICY)
    # A host sync in the middle of the forward, like transformers' own mask checks.
    model[1].register_forward_pre_hook(lambda module, args: args[0]["attention_mask"].sum().item() and None)
    with caplog.at_level(logging.WARNING, logger="st_npu.engine.graphs"):
        model.warmup(batch_size=8)
        model.warmup(batch_size=8)
        got = model.encode(TEXTS, batch_size=8)
    warnings = [r.message for r in caplog.records if "Graph capture failed" in r.message]
    assert len(warnings) == 1 and "not permitted when stream is capturing" in warnings[0]
    assert not engine_of(model).graphs.graphs
    assert np.abs(got - reference).max() <= 1e-6


@needs_emulator
def test_graphs_on_two_devices(tiny_cls):
    models = [_model(tiny_cls, f"npu:{index}") for index in (5, 6)]
    emulator.reset_stats()
    results = [model.encode(TEXTS, batch_size=8) for model in models]
    stats = emulator.stats()["per_device"]
    assert stats[5]["replays"] == stats[6]["replays"] >= 2
    assert np.abs(results[0] - results[1]).max() == 0


@needs_emulator
def test_patch_turns_graphs_on_for_stock_models(tiny_cls):
    with st_npu.patch(warmup=True):
        stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:7")
    assert engine_of(stock).graphs.graphs
    emulator.reset_stats()
    got = stock.encode(seed_sentences(), batch_size=32)
    counts = emulator.stats()["per_device"][7]
    assert counts["replays"] >= 1 and counts["compiles"] == 0
    expected = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(seed_sentences(), batch_size=32)
    assert np.abs(got - expected).max() <= 1e-6


@needs_emulator
def test_graphs_are_off_where_they_cannot_run(tiny_cls):
    assert engine_of(st_npu.SentenceTransformer(tiny_cls, device="cpu")).graphs is None
    assert engine_of(st_npu.SentenceTransformer(tiny_cls, device="npu:0", graphs=False)).graphs is None
    with pytest.raises(ValueError, match="graphs=True"):
        st_npu.SentenceTransformer(tiny_cls, device="cpu", graphs=True)


@needs_emulator
def test_sdpa_with_a_float_mask_misses_the_fused_kernel():
    q = torch.randn(1, 2, 4, 8, device="npu:0")
    emulator.reset_stats()
    with torch.inference_mode():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 4, 4, device="npu:0"))
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool,
                                                                                      device="npu:0"))
    assert emulator.stats()["sdpa_unfused"] == 1


@pytest.mark.skipif(os.environ.get("ST_NPU_TEST_DEVICE") != "npu", reason="needs Ascend (ST_NPU_TEST_DEVICE=npu)")
def test_graphs_on_ascend(tiny_cls):
    model = _model(tiny_cls, "npu:0")
    assert engine_of(model).graphs.graphs, engine_of(model).graphs.failed
    eager = st_npu.SentenceTransformer(tiny_cls, device="npu:0", static_shapes=POLICY, graphs=False)
    assert np.abs(model.encode(TEXTS, batch_size=8) - eager.encode(TEXTS, batch_size=8)).max() <= 1e-5


@needs_emulator
def test_info_reports_compile_mode_graph_capture_and_task_queue(monkeypatch):
    from st_npu.runtime import doctor

    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    runtime = doctor.collect()["runtime"]
    assert runtime["graph capture"] == "available" and runtime["task queue"] == "TASK_QUEUE_ENABLE=2"
    assert "compile mode" in runtime and "npu runtime" in doctor.format_report(doctor.collect())


@needs_emulator
def test_captured_graphs_share_one_pool_no_larger_than_the_eager_peak(tiny_cls):
    policy = ShapePolicy(seq_lengths=(16, 128), batch_sizes=(1, 8))
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:0", static_shapes=policy, graphs=False)
    resident = torch.npu.memory_allocated(0)
    torch.npu.reset_peak_memory_stats(0)
    # The largest shape, (8, max_seq_length), with a short row: padded batches take the masked path, as captured.
    model.encode(["word " * 1000] * 7 + ["word " * 300], batch_size=8)
    eager_peak = torch.npu.max_memory_allocated(0) - resident
    engine = accelerate(model, Options(static_shapes=policy))
    assert engine.capture(8) == len(policy.for_model(model.max_seq_length).shapes(8))
    held = torch.npu.memory_allocated(0) - resident
    assert eager_peak * 0.5 < held <= 1.5 * eager_peak


@needs_emulator
def test_two_threads_encoding_at_once_each_get_their_own_rows(tiny_cls):
    model = _model(tiny_cls, "npu:2")
    halves = [TEXTS[:6] * 3, TEXTS[6:] * 3]
    expected = [model.encode(texts, batch_size=8) for texts in halves]
    emulator.reset_stats()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that one thread's batch lands between another's steps
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda texts: [model.encode(texts, batch_size=8) for _ in range(3)], halves))
    finally:
        sys.setswitchinterval(switch)
    assert emulator.stats()["per_device"][2]["replays"] >= 6
    for got, want in zip(results, expected):
        assert all(np.array_equal(rows, want) for rows in got)


@needs_emulator
def test_an_error_between_staging_and_replay_releases_the_graph(tiny_cls):
    model = _model(tiny_cls, "npu:3")
    expected = model.encode(TEXTS, batch_size=8)
    runner = engine_of(model).graphs
    stage = runner.stage

    def failing_after_staging(features, batch):  # the batch is in the graph's buffers; its forward never comes
        stage(features, batch)
        raise RuntimeError("injected failure after staging")

    runner.stage = failing_after_staging
    with pytest.raises(RuntimeError, match="injected"):
        model.encode(TEXTS, batch_size=8)
    runner.stage = stage
    with ThreadPoolExecutor(max_workers=1) as pool:  # a graph still held would block this encode for good
        again = pool.submit(model.encode, TEXTS, batch_size=8).result(timeout=60)
    assert np.array_equal(again, expected)


@needs_emulator
def test_a_staged_batch_changed_before_its_forward_runs_eagerly_and_frees_the_graph(tiny_cls):
    model = _model(tiny_cls, "npu:5")
    engine, batch = engine_of(model), TEXTS[:8]
    expected = model.encode(batch, batch_size=8)
    # As stock's encode runs its batches: in inference mode, inside a call.
    with torch.inference_mode(), context.calling(engine, context.Call(tails=Tails())) as call:
        features = engine.preprocess(batch)
        assert call.batch.staged is not None
        changed = {**features, "input_ids": features["input_ids"].clone()}  # as a forward pre-hook might
        emulator.reset_stats()
        rows = engine.forward(changed)["sentence_embedding"]
    assert emulator.stats()["per_device"][5]["replays"] == 0
    assert np.abs(rows.cpu().numpy() - expected).max() <= 1e-6
    with ThreadPoolExecutor(max_workers=1) as pool:  # the graph was released: this encode replays
        pool.submit(model.encode, TEXTS, batch_size=8).result(timeout=60)
    assert emulator.stats()["per_device"][5]["replays"] >= 1
