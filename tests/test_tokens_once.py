"""Texts are tokenised once per call (st_npu.engine.tokens): the batches are cut from the call's tokens, which equal
what stock's own preprocess returns for each batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sentence_transformers
import torch

import st_npu
from st_npu.engine import engine_of
from st_npu.evaluation.workloads import mixed_corpus
from st_npu.testing.fixtures import cross_encoder_folder

TEXTS = mixed_corpus(48)


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerankers")
    return {arch: cross_encoder_folder(root / arch, arch) for arch in ("bert", "xlm-roberta")}


@pytest.fixture
def tokenised(monkeypatch):
    """Counts every input the fast tokenizers are asked to tokenise, wherever the call comes from."""
    from transformers import PreTrainedTokenizerBase

    counted = []
    original = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        counted.append(1 if isinstance(text, (str, tuple)) else len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    return counted


@pytest.mark.parametrize("device", ["cpu", "npu:2"])
def test_a_grouped_encode_tokenises_each_text_once(tiny_cls, tokenised, device):
    model = st_npu.SentenceTransformer(tiny_cls, device=device)
    tokenised.clear()
    got = model.encode(TEXTS, batch_size=8, prompt="query: ")
    assert sum(tokenised) == len(TEXTS)
    expected = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu").encode(
        TEXTS, batch_size=8, prompt="query: ")
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_a_reranker_call_tokenises_each_pair_once(rerankers, tokenised, arch):
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    model = st_npu.CrossEncoder(rerankers[arch], device="npu:3")
    tokenised.clear()
    got = model.predict(pairs, batch_size=8)
    assert sum(tokenised) == len(pairs)
    expected = sentence_transformers.CrossEncoder(str(rerankers[arch]), device="cpu").predict(pairs, batch_size=8)
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_batches_cut_from_the_calls_tokens_equal_stocks_preprocess(tiny_cls, rerankers, arch):
    rng = random.Random(0)
    if arch == "bert":
        model = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu")
        items, kwargs = TEXTS, {"prompt": "passage: "}
    else:
        model = sentence_transformers.CrossEncoder(str(rerankers[arch]), device="cpu")
        items, kwargs = [(TEXTS[i], TEXTS[(i * 7) % len(TEXTS)]) for i in range(len(TEXTS))], {"prompt": None}
    engine = st_npu.engine.accelerate(model)
    tokens = engine.tokenize(items, **kwargs)
    for _ in range(5):
        batch = rng.sample(items, 9)
        expected = type(model).preprocess(model, batch, **kwargs)
        got = tokens.features(batch)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    assert engine_of(model) is engine and tokens.features(["not one of the call's inputs"]) is None
