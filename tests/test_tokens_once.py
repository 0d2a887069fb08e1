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


PROMPT = "query: "


@pytest.fixture
def tokenised(monkeypatch):
    """Counts every input the tokenizers are asked to tokenise, wherever the call comes from, except the prompt on its
    own (stock tokenises it once per preprocess call to know its length)."""
    from transformers import PreTrainedTokenizerBase

    counted = []
    original = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        if text not in (PROMPT, [PROMPT]):
            counted.append(1 if isinstance(text, (str, tuple)) else len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    return counted


@pytest.mark.parametrize("device", ["cpu", "npu:2"])
def test_a_grouped_encode_tokenises_each_text_once(tiny_cls, tokenised, device):
    model = st_npu.SentenceTransformer(tiny_cls, device=device)
    tokenised.clear()
    got = model.encode(TEXTS, batch_size=8, prompt=PROMPT)
    assert sum(tokenised) == len(TEXTS)
    expected = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu").encode(
        TEXTS, batch_size=8, prompt=PROMPT)
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


def test_tokens_a_caller_computed_are_not_computed_again(tiny_cls, tokenised):
    """A server tokenises each request at admission; a device batch gathers several requests' tokens."""
    from st_npu.engine.tokens import Tokens

    model = st_npu.SentenceTransformer(tiny_cls, device="npu:2")
    engine = engine_of(model)
    kwargs = engine.preprocess_kwargs(prompt=PROMPT)
    requests = [engine.tokenize(TEXTS[:20], **kwargs), engine.tokenize(TEXTS[20:], **kwargs)]
    tokenised.clear()
    with engine.given_tokens(Tokens.join(requests)):
        got = model.encode(TEXTS[10:30], batch_size=8, prompt=PROMPT)
    assert sum(tokenised) == 0
    expected = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu").encode(
        TEXTS[10:30], batch_size=8, prompt=PROMPT)
    assert np.abs(got - expected).max() <= 1e-6
    assert Tokens.join([requests[0], engine.tokenize(TEXTS[:2], **engine.preprocess_kwargs())]) is None


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_tokens_from_a_servers_token_ids_equal_stocks_preprocess(tiny_cls, rerankers, arch):
    if arch == "bert":
        model = st_npu.SentenceTransformer(tiny_cls, device="cpu")
        items, entry = TEXTS[:12], {"prompt": PROMPT}
        ids = [model.tokenizer(PROMPT + text, truncation=True, max_length=model.max_seq_length)["input_ids"]
               for text in items]  # as the server's admission cuts them
    else:
        model = st_npu.CrossEncoder(rerankers[arch], device="cpu")
        items, entry = [(TEXTS[i], TEXTS[-1 - i]) for i in range(12)], {}
        ids = [model.tokenizer(query, document, truncation=True, max_length=model.max_length)["input_ids"]
               for query, document in items]
    engine = engine_of(model)
    kwargs = engine.preprocess_kwargs(**entry)
    tokens = engine.tokens_from_ids(items, ids, **entry)
    for batch in (items[:5], items[3:12]):
        expected = type(model).preprocess(model, batch, **kwargs)
        got = tokens.features(batch)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in expected.items())
    wrong = [list(reversed(row)) for row in ids]  # ids stock would not make: the call tokenises instead
    assert engine.tokens_from_ids(items, wrong, **entry) is None
