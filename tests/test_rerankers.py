"""Rerankers on the engine: ``st_npu.CrossEncoder`` and stock ``CrossEncoder`` under ``st_npu.patch()``, on tiny BERT
and XLM-R cross-encoders with random weights (bge-reranker-base/large are XLM-R). Scores are compared with stock on
the same weights; counts come from the emulated npu (device plumbing, not Ascend speed)."""

from __future__ import annotations

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from st_npu.engine import ShapePolicy, engine_of
from st_npu.emulator import backend as emulator
from st_npu.evaluation.workloads import mixed_corpus
from st_npu.testing.fixtures import cross_encoder_folder

TEXTS = mixed_corpus(40)
PAIRS = [(TEXTS[i], TEXTS[(i * 7 + 3) % len(TEXTS)]) for i in range(len(TEXTS))]
POLICY = ShapePolicy(seq_lengths=(16, 64, 128), batch_sizes=(1, 8))


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def reranker(request, tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("rerankers") / request.param, request.param)


@pytest.fixture(scope="module")
def stock_scores(reranker):
    return sentence_transformers.CrossEncoder(str(reranker), device="cpu").predict(PAIRS, batch_size=8)


def test_the_class_is_stocks_and_scores_like_it(reranker, stock_scores):
    model = st_npu.CrossEncoder(reranker, device="cpu")
    assert isinstance(model, sentence_transformers.CrossEncoder) and engine_of(model) is not None
    assert np.abs(model.predict(PAIRS, batch_size=8) - stock_scores).max() <= 1e-6
    ranked = model.rank(PAIRS[0][0], [document for _, document in PAIRS[:10]], return_documents=True)
    expected = sentence_transformers.CrossEncoder(str(reranker), device="cpu").rank(
        PAIRS[0][0], [document for _, document in PAIRS[:10]], return_documents=True)
    assert [row["corpus_id"] for row in ranked] == [row["corpus_id"] for row in expected]


@needs_emulator
def test_on_the_npu_nothing_compiles_after_warmup_and_each_batch_is_three_launches(reranker, stock_scores):
    model = st_npu.CrossEncoder(reranker, device="npu:4", static_shapes=POLICY)
    model.warmup(batch_size=8, show_progress_bar=False)
    emulator.reset_stats()
    got = model.predict(PAIRS, batch_size=8)
    counts = emulator.stats()["per_device"][4]
    assert counts["compiles"] == 0 and counts["replays"] >= len(PAIRS) // 8
    assert counts["launches"] == 3 * counts["replays"]
    assert np.abs(got - stock_scores).max() <= 1e-6
    for options in ({"convert_to_tensor": True}, {"apply_softmax": True}, {"convert_to_numpy": False}):
        expected = sentence_transformers.CrossEncoder(str(reranker), device="cpu").predict(PAIRS[:11], batch_size=8,
                                                                                          **options)
        scores = model.predict(PAIRS[:11], batch_size=8, **options)  # the batch size the warm-up compiled
        if isinstance(expected, torch.Tensor):
            assert scores.device == torch.device("npu:4") and scores.dtype == expected.dtype
            assert (scores.cpu() - expected).abs().max() <= 1e-6
        elif isinstance(expected, list):
            assert len(scores) == len(expected) and all(s.device == torch.device("npu:4") for s in scores)
        else:
            assert np.abs(scores - expected).max() <= 1e-6
    assert emulator.stats()["per_device"][4]["compiles"] == 0


@needs_emulator
def test_patch_accelerates_stock_cross_encoders(reranker, stock_scores):
    with st_npu.patch():
        model = sentence_transformers.CrossEncoder(str(reranker), device="npu:5")
    assert type(model) is sentence_transformers.CrossEncoder and engine_of(model).policy is not None
    assert np.abs(model.predict(PAIRS, batch_size=8) - stock_scores).max() <= 1e-6
    engine_of(model).undo()
    assert engine_of(model) is None and "predict" not in model.__dict__
