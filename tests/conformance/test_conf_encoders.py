"""CrossEncoder, SparseEncoder (SPLADE), MultiVectorEncoder and an LSTM model, as stock takes them (issue 22): the
differences upstream's own CrossEncoder and SparseEncoder tests found, each through every door."""

from __future__ import annotations

from unittest import mock

import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

from conformance.doors import DOORS, TEXTS
from st_npu.engine import engine_of
from st_npu.emulator import backend as emulator

PAIRS = [(query, text) for query in ("what is food", "x") for text in TEXTS]


def test_cross_encoder_from_modules_without_a_path(conform, models):
    def body(door):
        modules = list(door.build("CrossEncoder", str(models["reranker"])))
        model = door.build("CrossEncoder", modules=modules)
        return [model.predict(PAIRS, batch_size=4), model.rank("what is food", TEXTS, return_documents=False)]

    conform(body)


def test_cross_encoder_takes_stock_constructor_arguments(conform, models):
    def body(door):
        model = door.build("CrossEncoder", str(models["reranker"]), max_length=8,
                           activation_fn=torch.nn.Identity(), prompts={"q": "query: "}, default_prompt_name="q")
        return [model.max_length, model.predict(PAIRS, batch_size=3)]

    conform(body)


def test_cross_encoder_unknown_argument_raises_type_error_as_stock(conform, models):
    conform(lambda door: door.build("CrossEncoder", str(models["reranker"]), no_such_argument=1))


@pytest.mark.parametrize("class_name, method, inputs", [("CrossEncoder", "predict", PAIRS),
                                                         ("SentenceTransformer", "encode", TEXTS)])
def test_an_entry_replaced_on_the_class_is_called_as_written(conform, models, class_name, method, inputs):
    folder = models["reranker" if class_name == "CrossEncoder" else "transformer"]

    def body(door):
        model = door.build(class_name, str(folder))
        calls = []

        def replaced(self, *args, **kwargs):
            calls.append((args, kwargs))
            return "the caller's result"

        with mock.patch.object(type(model), method, replaced):
            result = getattr(model, method)(inputs, batch_size=2)
        return [result, calls, getattr(model, method)(inputs[:3])]

    conform(body)


def test_a_subclass_override_of_predict_is_called(conform, models):
    def body(door):
        base = type(door.build("CrossEncoder", str(models["reranker"])))

        class Scaled(base):
            def predict(self, inputs, **kwargs):
                return base.predict(self, inputs, **kwargs) * 2

        return Scaled(str(models["reranker"]), device=door.device).predict(PAIRS, batch_size=4)

    conform(body)


def _sparse(model, texts):
    """A SparseEncoder's outputs in every shape stock gives them, on the host (dense, for comparing)."""
    embeddings = model.encode(texts, batch_size=4)
    return {
        "layout": str(embeddings.layout),
        "dense": embeddings.to_dense().cpu(),
        "rows": [row.to_dense().cpu() for row in model.encode(texts, batch_size=4, convert_to_tensor=False)],
        "not_sparse": model.encode(texts, batch_size=4, convert_to_sparse_tensor=False).cpu(),
        "one": model.encode(texts[0]).to_dense().cpu(),
        "top": model.encode(texts, max_active_dims=5).to_dense().cpu(),
        # Dot products over the vocabulary reach thousands: compared relative to the largest.
        "similarity": _relative(model.similarity(embeddings, embeddings).cpu()),
        "on_cpu": model.encode(texts, save_to_cpu=True).to_dense(),
    }


def _relative(scores):
    return scores / scores.abs().max()


def test_splade_sparse_encoder_encodes_as_stock(conform, models):
    conform(lambda door: _sparse(door.build("SparseEncoder", str(models["splade"])), TEXTS))


def test_splade_query_and_document_as_stock(conform, models):
    def body(door):
        model = door.build("SparseEncoder", str(models["splade"]))
        return [model.encode_query(TEXTS).to_dense().cpu(), model.encode_document(TEXTS[:2]).to_dense().cpu(),
                model.encode([], batch_size=4).to_dense().cpu()]

    conform(body)


@needs_emulator
def test_sparse_tensors_stay_on_the_npu_they_were_made_on(models):
    model = sentence_transformers.SparseEncoder(str(models["splade"]), device="npu:3")
    embeddings = model.encode(TEXTS)
    assert embeddings.device == torch.device("npu:3") and embeddings.is_sparse
    assert embeddings._indices().device == embeddings._values().device == torch.device("npu:3")
    assert model.encode(TEXTS, save_to_cpu=True).device.type == "cpu"


def test_lstm_model_packs_its_lengths_on_the_cpu_as_stock(conform, models):
    conform(lambda door: door.load(models["lstm"]).encode(TEXTS, batch_size=4))


def _multi_vector(model):
    return [
        [rows.cpu() for rows in model.encode(TEXTS, batch_size=4)],
        [rows.cpu() for rows in model.encode_query(TEXTS[:3])],
        [rows.cpu() for rows in model.encode_document(TEXTS, batch_size=3)],
        model.encode(TEXTS, convert_to_numpy=True, batch_size=4),
        model.encode(TEXTS[0]).cpu(),
        model.similarity(model.encode_query(TEXTS[:2]), model.encode_document(TEXTS)).cpu(),
    ]


@pytest.mark.skipif(not hasattr(sentence_transformers, "MultiVectorEncoder"),
                    reason="MultiVectorEncoder arrived in sentence-transformers 6.3")
def test_multi_vector_encoder_as_stock(conform, models):
    conform(lambda door: _multi_vector(door.build("MultiVectorEncoder", str(models["multi_vector"]))))


@needs_emulator
@pytest.mark.skipif(not hasattr(sentence_transformers, "MultiVectorEncoder"),
                    reason="MultiVectorEncoder arrived in sentence-transformers 6.3")
@pytest.mark.parametrize("door_name", ["npu", "patch"])
def test_multi_vector_encoder_runs_static_shapes_and_bool_masks_on_npu(models, door_name):
    door = DOORS[door_name]
    with door.active():
        model = door.build("MultiVectorEncoder", str(models["multi_vector"]))
    engine = engine_of(model)
    assert engine is not None and engine.policy is not None
    shapes = []
    model[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    emulator.reset_stats()
    model.encode(TEXTS, batch_size=4)
    allowed = {(rows, tokens) for rows in engine.policy.batch_sizes for tokens in engine.policy.seq_lengths}
    assert shapes and set(shapes) <= allowed
    assert emulator.stats()["sdpa_unfused"] == 0
