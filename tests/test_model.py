"""st_npu.SentenceTransformer against stock sentence-transformers on CPU: same pipeline, same numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import copy_folder
from sentence_transformers import util

import st_npu
from st_npu.loading.folder import ModelFolderError, ModelNotFoundError

TEXTS = [
    "Hello world",
    "A man is eating food.",
    "今天天气很好，我们去公园散步吧。",
    "def add(a, b):\n    return a + b",
    "Emoji 🙂 and symbols <>&%$#@!",
    "x",
    "A much longer sentence that goes on and on to make sure that padding inside a batch is exercised properly. " * 3,
]


def stock(folder, **kwargs):
    return sentence_transformers.SentenceTransformer(str(folder), device="cpu", **kwargs)


@pytest.mark.parametrize("fixture", ["minilm", "minilm_cls"])
def test_equals_stock_on_real_weights(fixture, request):
    folder = request.getfixturevalue(fixture)
    ours = st_npu.SentenceTransformer(folder, device="cpu")
    expected = stock(folder).encode(TEXTS, batch_size=3)
    got = ours.encode(TEXTS, batch_size=3)
    assert isinstance(ours, sentence_transformers.SentenceTransformer)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - expected).max() <= 1e-6
    assert [type(module).__name__ for module in ours] == ["Transformer", "Pooling", "Normalize"]


def test_cls_and_mean_really_differ(minilm, minilm_cls):
    mean = st_npu.SentenceTransformer(minilm, device="cpu").encode(TEXTS[:2])
    cls = st_npu.SentenceTransformer(minilm_cls, device="cpu").encode(TEXTS[:2])
    assert np.abs(mean - cls).max() > 1e-2


def test_llm_embedder_shape_matches_cls_l2_computed_with_transformers(llm_like):
    from transformers import AutoModel, AutoTokenizer

    model = st_npu.SentenceTransformer(llm_like, device="cpu")
    got = model.encode(TEXTS, batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(llm_like)
    bert = AutoModel.from_pretrained(llm_like).eval()
    with torch.inference_mode():
        batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
        cls = bert(**batch).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    assert got.shape == (len(TEXTS), 768)
    assert np.abs(got - expected).max() <= 1e-5
    assert model.max_seq_length == 512


def test_llm_embedder_prompts_and_retrieval_api(llm_like):
    model = st_npu.SentenceTransformer(llm_like, device="cpu")
    spec = st_npu.loading.folder.spec_by_name("BAAI/llm-embedder")
    assert model.prompts["qa_query"] == spec["instructions"]["qa"]["query"]
    assert model.prompts["tool_key"] == spec["instructions"]["tool"]["key"]
    query = model.encode_query(["what is the capital of France?"])
    manual = model.encode([spec["instructions"]["qa"]["query"] + "what is the capital of France?"])
    assert np.abs(query - manual).max() <= 1e-6
    document = model.encode_document(["Paris is the capital of France."])
    manual = model.encode([spec["instructions"]["qa"]["key"] + "Paris is the capital of France."])
    assert np.abs(document - manual).max() <= 1e-6
    plain = stock(llm_like).encode(TEXTS)  # plain encode stays identical to stock: no prompt added
    assert np.abs(model.encode(TEXTS) - plain).max() <= 1e-6
    scores = model.similarity(query, model.encode(TEXTS, convert_to_tensor=True))
    assert scores.shape == (1, len(TEXTS))
    hits = util.semantic_search(torch.from_numpy(query), model.encode(TEXTS, convert_to_tensor=True), top_k=3)
    assert len(hits[0]) == 3


def test_save_round_trips_through_stock(minilm_cls, tmp_path):
    model = st_npu.SentenceTransformer(minilm_cls, device="cpu")
    model.save(str(tmp_path / "saved"))
    reloaded = stock(tmp_path / "saved")
    assert np.abs(reloaded.encode(TEXTS) - model.encode(TEXTS)).max() <= 1e-6


def test_multi_process_pool_matches_single_process(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu")
    single = model.encode(TEXTS * 3)
    pooled = model.encode(TEXTS * 3, device=["cpu", "cpu"], chunk_size=5)
    assert np.abs(pooled - single).max() <= 1e-6


def test_folder_without_modules_json_known_model_uses_spec(llm_like, tmp_path):
    folder = copy_folder(llm_like, tmp_path / "llm-embedder")
    for name in ("modules.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "1_Pooling")
    model = st_npu.SentenceTransformer(folder, device="cpu")
    assert model[1].pooling_mode == "cls"
    assert np.abs(model.encode(TEXTS) - stock(llm_like).encode(TEXTS)).max() <= 1e-6


def test_folder_without_modules_json_unknown_model_refuses_to_guess(tiny_cls, tmp_path):
    folder = copy_folder(tiny_cls, tmp_path / "some-model")
    (folder / "modules.json").unlink()
    with pytest.raises(ModelFolderError, match="pooling of this model cannot be inferred"):
        st_npu.SentenceTransformer(folder, device="cpu")
    with pytest.raises(ModelFolderError, match="hidden_size 32.*not BAAI/llm-embedder"):
        st_npu.SentenceTransformer(folder, device="cpu", spec="llm-embedder")


def _break(folder, name, content=None):
    path = folder / name
    if content is None:
        path.unlink()
    else:
        path.write_text(content)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: [_break(f, "tokenizer.json"), _break(f, "vocab.txt")], "no tokenizer files"),
        (lambda f: _break(f, "config.json"), r"config\.json is missing"),
        (lambda f: _break(f, "model.safetensors"), "has no weights"),
        (lambda f: _break(f, "modules.json", "[{"), r"modules\.json is malformed JSON \(line 1"),
        (lambda f: _break(f, "1_Pooling/config.json", json.dumps({"word_embedding_dimension": 64,
                                                                   "pooling_mode_cls_token": True})),
         r"1_Pooling/config\.json: the pooling dimension 64 disagrees with hidden_size 32"),
        (lambda f: _break(f, "1_Pooling/config.json", json.dumps({"word_embedding_dimension": 32})),
         "enables no pooling mode"),
        (lambda f: _break(f, "sentence_bert_config.json", '{"max_seq_length": 4096}'), "exceeds"),
    ],
    ids=["tokenizer", "config", "weights", "malformed", "dimension", "no-mode", "max-length"],
)
def test_broken_folder_fails_at_construction_naming_the_file(tiny_cls, tmp_path, change, message):
    folder = copy_folder(tiny_cls, tmp_path / "broken")
    change(folder)
    with pytest.raises(ModelFolderError, match=message):
        st_npu.SentenceTransformer(folder, device="cpu")


def test_non_string_input_names_position_and_type(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu")
    with pytest.raises(ValueError, match=r"index 2 \(3\): Unsupported input type: int"):
        model.encode(["a", "b", 3, "d"])
    with pytest.raises(ValueError, match=r"index 0 \(None\): Unsupported input type: NoneType"):
        model.encode_query([None])


def test_edge_case_texts_work(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu")
    assert len(model.encode([])) == 0
    edge = ["", "x" * 100_000, "tab\there\x00\x07\x1b[31m control", "\n\n  \t"]
    got = model.encode(edge)
    assert got.shape == (4, 32) and np.isfinite(got).all()
    assert np.abs(got - stock(tiny_cls).encode(edge)).max() <= 1e-6
    assert model.encode("one string").shape == (32,)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.bfloat16, "fp32"])
def test_dtypes_on_cpu(tiny_cls, dtype):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu", dtype=dtype)
    assert next(model.parameters()).dtype == st_npu.runtime.devices.resolve_dtype(dtype)
    reference = stock(tiny_cls).encode(TEXTS)
    got = model.encode(TEXTS)
    cosine = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.min() > 0.99


def test_bad_dtype_and_kwargs_are_named(tiny_cls):
    with pytest.raises(ValueError, match="'int8'"):
        st_npu.SentenceTransformer(tiny_cls, device="cpu", dtype="int8")
    with pytest.raises(TypeError, match="devcie"):
        st_npu.SentenceTransformer(tiny_cls, devcie="cpu")


def test_hub_id_offline_and_not_cached_names_the_id_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'BAAI/llm-embedder'.*hf download BAAI/llm-embedder"):
        st_npu.SentenceTransformer(device="cpu", cache_folder=str(tmp_path))


def test_hub_id_resolves_from_the_local_cache(llm_like, tmp_path):
    commit = "0" * 40
    snapshot = tmp_path / "models--BAAI--llm-embedder" / "snapshots" / commit
    copy_folder(llm_like, snapshot)
    (tmp_path / "models--BAAI--llm-embedder" / "refs").mkdir()
    (tmp_path / "models--BAAI--llm-embedder" / "refs" / "main").write_text(commit)
    model = st_npu.SentenceTransformer("BAAI/llm-embedder", device="cpu", cache_folder=str(tmp_path))
    assert model.model_spec["name"] == "BAAI/llm-embedder"
    assert model.encode("hi").shape == (768,)


def test_modules_argument_builds_from_modules(tiny_cls):
    modules = list(st_npu.SentenceTransformer(tiny_cls, device="cpu"))
    model = st_npu.SentenceTransformer(modules=modules, device="cpu")
    assert model.encode("hi").shape == (32,)


def test_models_without_a_transformer_are_checked_then_loaded_by_stock(tmp_path):
    from st_npu.testing.fixtures import static_folder

    folder = static_folder(tmp_path / "static")
    model = st_npu.SentenceTransformer(folder, device="cpu")
    assert [type(module).__name__ for module in model] == ["StaticEmbedding"]
    (folder / "modules.json").write_text('[{"type": "sentence_transformers.models.StaticEmbedding"')
    with pytest.raises(ModelFolderError, match=r"modules\.json is malformed JSON"):
        st_npu.SentenceTransformer(folder, device="cpu")


def test_model_path_that_is_a_file_raises_a_not_a_directory_error(tiny_cls):
    with pytest.raises(NotADirectoryError, match=r"config\.json is a file"):
        st_npu.SentenceTransformer(tiny_cls / "config.json", device="cpu")
