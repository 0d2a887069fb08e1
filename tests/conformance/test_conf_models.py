"""Every model type stock loads, st_npu loads to the same modules and outputs (issue 17, causes 1, 2 and 4)."""

from __future__ import annotations

import json
import shutil

import pytest

from conformance.doors import TEXTS, logged

MODEL_TYPES = {  # name: the keyword arguments stock needs to load it
    "transformer": {},
    "static": {},
    "words": {},
    "router": {},
    "custom": {"trust_remote_code": True},
    "minilm": {},
}


def describe(model):
    """What a loaded model is and gives: module types, sizes, and its embeddings as arrays and as tensors."""
    return {
        "modules": [type(module) for module in model],
        "max_seq_length": model.max_seq_length,
        "similarity_fn_name": model.similarity_fn_name,
        "prompts": model.prompts,
        "arrays": model.encode(TEXTS, batch_size=4),
        "tensor": model.encode(TEXTS[:3], convert_to_tensor=True).cpu(),
        "one": model.encode(TEXTS[0]),
    }


@pytest.mark.parametrize("kind", list(MODEL_TYPES))
def test_model_types_load_and_encode_as_stock(conform, models, kind):
    folder = models[kind]
    conform(lambda door: describe(door.load(folder, **MODEL_TYPES[kind])))


def test_router_routes_queries_and_documents_as_stock(conform, models):
    def body(door):
        model = door.load(models["router"])
        return [model.encode_query(TEXTS), model.encode_document(TEXTS), model.encode(TEXTS, task="query")]

    conform(body)


def test_custom_module_needs_trust_remote_code_as_stock(conform, models):
    # sentence-transformers 6 refuses custom code without trust_remote_code; 5.x loads it with a warning
    conform(lambda door: [type(module).__name__ for module in door.load(models["custom"])])


def test_loading_logs_stock_line(conform, models):
    def body(door):
        with logged() as messages:
            door.load(models["transformer"])
        return [message for message in messages if message.startswith("Loading SentenceTransformer model from")]

    lines = conform(body)
    assert lines  # stock logs it: the door must too, not only agree on an empty list


def test_requirements_are_checked_as_stock(conform, models, tmp_path):
    folder = shutil.copytree(models["static"], tmp_path / "needs")
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config["requirements"] = {"torch": ">=999"}  # sentence-transformers 6 refuses; 5.x ignores the key
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    conform(lambda door: [type(module) for module in door.load(folder)])


def test_saved_model_type_converts_through_subclass_override(conform, models, tmp_path):
    folder = shutil.copytree(models["transformer"], tmp_path / "sparse")
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config["model_type"] = "SparseEncoder"
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))

    def body(door):
        calls = []

        class Converting(door.cls):
            def _load_converted_modules(self, *args, **kwargs):
                calls.append(kwargs.get("model_type"))
                return super()._load_converted_modules(*args, **kwargs)

        model = Converting(str(folder), device=door.device)
        return calls, [type(module) for module in model], model.encode(TEXTS)

    calls, _, _ = conform(body)
    assert calls == ["SparseEncoder"]
