"""Static shapes, warm-up, host/device overlap and out-of-memory backoff.

Compile counts come from the emulated npu: they prove which shapes reach the device, not Ascend compile times.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from st_npu import _compat
from st_npu.engine import Options, ShapePolicy, accelerate, engine_of
from st_npu.emulator import backend as emulator
from st_npu.evaluation.workloads import mixed_corpus
from st_npu.testing import fixtures

CORPUS = mixed_corpus(64)


def test_policy_buckets():
    policy = ShapePolicy(seq_lengths=(16, 64, 512), batch_sizes=(1, 8, 32))
    assert [policy.seq_bucket(n) for n in (1, 16, 17, 64, 65, 512)] == [16, 16, 64, 64, 512, 512]
    assert [policy.batch_bucket(n) for n in (1, 2, 8, 9, 32, 33, 100)] == [1, 8, 8, 32, 32, 64, 128]
    assert policy.for_model(128).seq_lengths == (16, 64, 128)
    assert policy.shapes(8) == [(1, 16), (1, 64), (1, 512), (8, 16), (8, 64), (8, 512)]
    with pytest.raises(ValueError, match="seq_lengths"):
        ShapePolicy(seq_lengths=(0, 16))


@pytest.mark.parametrize("fixture", ["minilm", "minilm_cls"])
def test_static_shapes_are_numerically_neutral_on_real_weights(fixture, request):
    folder = request.getfixturevalue(fixture)
    plain = st_npu.SentenceTransformer(folder, device="cpu", static_shapes=False).encode(CORPUS[:24], batch_size=7)
    model = st_npu.SentenceTransformer(folder, device="cpu", static_shapes=True)
    padded = model.encode(CORPUS[:24], batch_size=7)
    assert np.abs(padded - plain).max() <= 1e-6
    stock_tokens = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
        CORPUS[:5], output_value="token_embeddings")
    tokens = model.encode(CORPUS[:5], output_value="token_embeddings")
    assert [t.shape for t in tokens] == [t.shape for t in stock_tokens]
    assert max((a - b).abs().max().item() for a, b in zip(tokens, stock_tokens)) <= 1e-5


def test_padding_reaches_the_model_and_undo_restores_stock(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu", static_shapes=True)
    shapes = []
    handle = model[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    model.encode(["a b c", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"],
                 batch_size=3)
    assert shapes == [(1, 16), (1, 24)]  # one bucket group each: the long text no longer pads the short one
    engine_of(model).undo()
    assert not {"encode", "preprocess", "forward", "_input_length"} & set(model.__dict__) and engine_of(model) is None
    model.encode(["a b c"])
    handle.remove()
    assert shapes[-1] == (1, 5)


def test_static_shapes_default_on_for_npu_only(tiny_cls):
    assert engine_of(st_npu.SentenceTransformer(tiny_cls, device="cpu")).policy is None
    assert engine_of(st_npu.SentenceTransformer(tiny_cls, device="npu:0")).policy is not None


@needs_emulator
def test_no_compilation_after_warmup_where_stock_compiles(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:1", static_shapes=ShapePolicy(batch_sizes=(1, 4, 8)))
    assert model.warmup(batch_size=8) == 3 * len(engine_of(model).policy.seq_lengths)
    emulator.reset_stats()
    got = model.encode(CORPUS, batch_size=8)
    assert emulator.stats()["per_device"][1]["compiles"] == 0
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:2")
    emulator.reset_stats()
    expected = stock.encode(CORPUS, batch_size=8)
    assert emulator.stats()["per_device"][2]["compiles"] > 0
    assert np.abs(got - expected).max() <= 1e-6


def test_warmup_runs_the_bucket_shapes_on_the_cpu_for_embedders_and_rerankers(tiny_cls, tmp_path):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu")  # static shapes off: the shapes encode will form
    seen = set()
    model[0].register_forward_pre_hook(lambda module, args: seen.add(tuple(args[0]["input_ids"].shape)))
    assert model.warmup(batch_size=2, show_progress_bar=False) == len(engine_of(model).shapes(2))
    buckets = engine_of(model).buckets.for_model(model.max_seq_length)  # unpadded: each within its bucket
    assert {(rows, buckets.seq_bucket(length)) for rows, length in seen} == set(engine_of(model).shapes(2))
    reranker = st_npu.CrossEncoder(str(fixtures.cross_encoder_folder(tmp_path / "rerank")), device="cpu")
    assert reranker.warmup(batch_size=2, show_progress_bar=False) == len(engine_of(reranker).shapes(2)) > 0


def test_accelerate_works_on_a_stock_model_and_again_replaces_itself(tiny_cls):
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:0")
    expected = stock.encode(CORPUS[:20], batch_size=6)
    first = accelerate(stock)
    second = accelerate(stock)  # replaces the first: one engine, one set of hooks
    assert engine_of(stock) is second and second is not first
    assert len(stock[0]._forward_pre_hooks) == 1
    assert np.abs(stock.encode(CORPUS[:20], batch_size=6) - expected).max() <= 1e-6


def test_overlap_keeps_order_and_uses_prefetched_batches(tiny_cls):
    # Texts of one sequence bucket: one group, so one stock encode call prefetches them all.
    texts = [" ".join(["word"] * (20 + i % 7)) + f" {i}" for i in range(40)]  # 23 to 29 tokens
    reference = st_npu.SentenceTransformer(tiny_cls, device="cpu", overlap=False).encode(texts, batch_size=8)
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:0")
    assert engine_of(model).prefetch
    got = model.encode(texts, batch_size=8)
    batches = -(-len(texts) // 8)
    assert model.last_overlap == {"hits": batches - 1, "misses": 0}
    assert np.abs(got - reference).max() <= 1e-6


def test_overlap_with_a_wrong_prediction_falls_back_without_losing_texts(tiny_cls, monkeypatch):
    reference = st_npu.SentenceTransformer(tiny_cls, device="cpu", overlap=False).encode(CORPUS, batch_size=8)
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu", overlap=True)
    monkeypatch.setattr(_compat, "predicted_batches", lambda m, inputs, size: [inputs[i:i + size] for i in
                                                                                range(0, len(inputs), size)])
    got = model.encode(CORPUS, batch_size=8)
    assert model.last_overlap["misses"] >= 1
    assert np.abs(got - reference).max() <= 1e-6


@needs_emulator
def test_out_of_memory_splits_the_batch_and_keeps_order(tiny_cls, caplog):
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:5", overlap=False)  # static shapes: 12 rows -> 16
    texts = sorted(CORPUS, key=len)[-12:]
    expected = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(texts, batch_size=16)
    peaks = {}
    for rows in (6, 12):  # static shapes run 6 rows as 8 and 12 as 16: halves of a split 16 fit the limit below
        torch.npu.reset_peak_memory_stats(5)
        model.encode(texts[:rows], batch_size=rows)
        peaks[rows] = torch.npu.max_memory_allocated(5)
    assert peaks[12] > peaks[6]
    emulator.set_memory_limit((peaks[6] + peaks[12]) // 2)
    try:
        with caplog.at_level(logging.WARNING, logger="st_npu.engine.oom"):
            got = model.encode(texts, batch_size=16)
            model.encode(texts, batch_size=16)
    finally:
        emulator.set_memory_limit(None)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6
    assert sum("out of memory" in record.message for record in caplog.records) == 1
