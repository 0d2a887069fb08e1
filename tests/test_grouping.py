"""Bucket-grouped encode, compile-free tails, and padding that stays inside encode (st_npu.engine.grouping)."""

from __future__ import annotations

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from st_npu.engine import Options, accelerate
from st_npu.emulator import backend as emulator
from st_npu.evaluation.workloads import mixed_corpus, seed_sentences

TEXTS = seed_sentences()
OPTIONS = [
    {},
    {"convert_to_tensor": True},
    {"normalize_embeddings": True},
    {"convert_to_tensor": True, "normalize_embeddings": True},
    {"convert_to_numpy": False},
    {"precision": "int8"},
    {"precision": "ubinary", "convert_to_tensor": True},
    {"truncate_dim": 16, "normalize_embeddings": True},
    {"prompt": "query: "},
    {"output_value": "token_embeddings"},
    {"output_value": None},
]


def _same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, list):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            _same(a, b)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            _same(got[key], expected[key])
    elif isinstance(expected, torch.Tensor):
        assert (got.shape, got.dtype, got.device) == (expected.shape, expected.dtype, expected.device)
        assert (got.double() - expected.double()).abs().max().item() <= (1 if not got.is_floating_point() else 1e-6)
    elif isinstance(expected, np.ndarray):
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
        assert np.abs(got.astype(np.float64) - expected.astype(np.float64)).max() <= (
            1e-6 if np.issubdtype(expected.dtype, np.floating) else 1)
    else:
        assert got == expected


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_grouped_encode_returns_what_stock_returns(tiny_cls, options):
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu")
    patched = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu")
    accelerate(patched, Options(static_shapes=True))  # what st_npu.patch() does to a stock model, padding forced
    # output_value=None returns each row's padded inputs, which depend on how batches were formed: compared on the
    # stock model accelerated in place, whose batches form exactly as stock's.
    models = [patched] if options.get("output_value", "") is None else [
        patched, st_npu.SentenceTransformer(tiny_cls, device="cpu", static_shapes=True)]
    for ours, inputs in ((model, inputs) for model in models for inputs in (TEXTS, TEXTS[3])):
        try:
            expected = stock.encode(inputs, batch_size=8, **options)
        except (ValueError, IndexError) as exc:  # int8 ranges from one embedding; 5.5's output_value=None on
            # one string: stock's own failure, so ours fails alike
            with pytest.raises(type(exc)):
                ours.encode(inputs, batch_size=8, **options)
            continue
        _same(ours.encode(inputs, batch_size=8, **options), expected)


def test_one_long_text_no_longer_pads_the_short_ones(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu", static_shapes=True)
    shapes = []
    model[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    model.encode(TEXTS, batch_size=32)
    assert len(shapes) > 1 and min(tokens for _, tokens in shapes) == 16


@needs_emulator
@pytest.mark.parametrize("graphs", [True, False])
def test_no_encode_option_compiles_after_warmup(tiny_cls, graphs):
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:3", graphs=graphs)
    model.warmup(batch_size=8)
    emulator.reset_stats()
    corpus = mixed_corpus(40)
    for rows in (1, 3, 5, 11):
        for options in ({}, {"convert_to_tensor": True}, {"normalize_embeddings": True},
                        {"convert_to_tensor": True, "normalize_embeddings": True}, {"convert_to_numpy": False}):
            model.encode(corpus[:rows], batch_size=8, **options)
    assert emulator.stats()["per_device"][3]["compiles"] == 0


@needs_emulator
def test_tokenize_and_preprocess_outside_encode_are_stocks(tiny_cls):
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:4")
    ours = st_npu.SentenceTransformer(tiny_cls, device="npu:4")
    texts = ["a short one", "and another short text"]
    for method in ("preprocess", "tokenize"):
        if not hasattr(stock, method):
            continue
        got, expected = getattr(ours, method)(texts), getattr(stock, method)(texts)
        assert {k: tuple(v.shape) for k, v in got.items() if isinstance(v, torch.Tensor)} == {
            k: tuple(v.shape) for k, v in expected.items() if isinstance(v, torch.Tensor)}


def test_groups_of_one_row_batches_run_as_one_stock_call(tiny_cls, monkeypatch):
    """At batch size 1 nothing pads, whichever bucket a text is in: the call is one stock encode, not one per
    bucket (each stock call has its own overhead), and the rows are stock's."""
    from st_npu.engine import grouping

    assert grouping.join_single_rows([[0], [1, 2], [3], [4]], [4, 1, 1, 2]) == ([[0], [1, 2, 3], [4]], [4, 1, 2])
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu")
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu", static_shapes=True)
    calls = []
    entry = grouping.run
    monkeypatch.setattr(grouping, "run", lambda *args, **kwargs: calls.append(args[5]) or entry(*args, **kwargs))
    got = model.encode(TEXTS, batch_size=1)
    assert len(calls) == 1 and len(calls[0]) == 1  # one group: one stock encode
    assert np.abs(got - stock.encode(TEXTS, batch_size=1)).max() <= 1e-6
    model.encode(TEXTS, batch_size=8)
    assert len(calls[1]) > 1  # batches of several rows still run by bucket
    plain = st_npu.SentenceTransformer(tiny_cls, device="cpu")  # no static shapes: stock's own path at batch size 1
    assert np.abs(plain.encode(TEXTS, batch_size=1) - stock.encode(TEXTS, batch_size=1)).max() <= 1e-6
    assert len(calls) == 2
