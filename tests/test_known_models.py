"""Known models beyond llm-embedder (configs/models): recognised by hub id or folder name, their specs supply what
the hub folder lacks, and a folder's own sentence-transformers files win (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil

import numpy as np
import pytest
import sentence_transformers

import st_npu
from st_npu.loading.folder import find_spec, known_specs
from st_npu.testing import fixtures

QWEN3_RERANKER_CARD = (  # the model card's format, written out
    '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: Given a web '
    'search query, retrieve relevant passages that answer the query\n<Query>: {query}\n<Document>: {document}'
    '<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n')


def test_every_spec_is_named_once_and_says_its_architecture():
    specs = known_specs()
    names = [alias.lower() for spec in specs for alias in (spec["name"], *spec.get("aliases", ()))]
    assert len(names) == len(set(names))
    for spec in specs:
        assert {"model_type", "hidden_size", "num_hidden_layers"} <= set(spec["architecture"])
        if not spec.get("reranker"):
            assert spec["pooling_mode"] in ("cls", "lasttoken") and spec["normalize"] is True
    assert find_spec("Qwen/Qwen3-Reranker-0.6B") is None  # an embedder's lookup never finds a reranker
    assert find_spec("Qwen/Qwen3-Reranker-0.6B", reranker=True)["chat_template"]


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory):
    return fixtures.qwen3_reranker_folder(tmp_path_factory.mktemp("known") / "Qwen--Qwen3-Reranker-0.6B")


def _rendered(model, query, document):
    return model.tokenizer.decode(model.preprocess([(query, document)])["input_ids"][0])


def test_qwen3_reranker_gets_its_model_card_template_and_stock_keeps_its_own(reranker_folder):
    query, document = "What is the capital of China?", "The capital of China is Beijing."
    ours = st_npu.CrossEncoder(reranker_folder, device="cpu")
    assert ours.model_spec["name"] == "Qwen/Qwen3-Reranker-0.6B"
    assert _rendered(ours, query, document) == QWEN3_RERANKER_CARD.format(query=query, document=document)
    own = ours.preprocess([(query, document)], processing_kwargs={"chat_template": {"instruction": "Find code"}})
    assert "<Instruct>: Find code\n<Query>" in ours.tokenizer.decode(own["input_ids"][0])
    stock = sentence_transformers.CrossEncoder(str(reranker_folder), device="cpu")
    assert _rendered(stock, query, document) != _rendered(ours, query, document)  # stock: the tokenizer's own
    with st_npu.patch():  # the patch scores as stock would
        patched = sentence_transformers.CrossEncoder(str(reranker_folder), device="cpu")
    assert _rendered(patched, query, document) == _rendered(stock, query, document)


def test_a_reranker_template_of_its_own_wins(reranker_folder, tmp_path):
    folder = shutil.copytree(reranker_folder, tmp_path / "Qwen3-Reranker-0.6B")
    own = ("{{ (messages | selectattr('role', 'eq', 'query') | first).content }}|"
           "{{ (messages | selectattr('role', 'eq', 'document') | first).content }}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": own}))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    model = st_npu.CrossEncoder(folder, device="cpu")
    assert _rendered(model, "q", "d") == "q|d"


def test_qwen3_embedding_folder_without_sentence_transformers_files_is_built_from_its_spec(tmp_path):
    """The spec says last-token pooling, Normalize, left padding and the query instruction; the result equals
    stock on the same weights with Qwen3-Embedding's own sentence-transformers files."""
    bare = fixtures.qwen3_embedder_folder(tmp_path / "Qwen--Qwen3-Embedding-0.6B", hidden_size=1024,
                                          sentence_transformers_files=False)
    full = fixtures.qwen3_embedder_folder(tmp_path / "full", hidden_size=1024)
    model = st_npu.SentenceTransformer(bare, device="cpu")
    assert model.model_spec["name"] == "Qwen/Qwen3-Embedding-0.6B" and model.tokenizer.padding_side == "left"
    stock = sentence_transformers.SentenceTransformer(str(full), device="cpu")
    assert model.prompts["query"] == stock.prompts["query"]
    texts = ["Hello world", "今天天气很好", "a longer sentence " * 5]
    for options in ({"prompt_name": "query"}, {"truncate_dim": 64}):
        assert np.abs(model.encode(texts, **options) - stock.encode(texts, **options)).max() <= 1e-5


def test_bge_large_zh_gets_its_query_instruction_and_a_folder_prompt_wins(tmp_path):
    folder = fixtures.bert_folder(tmp_path / "bge-large-zh-v1.5")
    model = st_npu.SentenceTransformer(folder, device="cpu")
    assert model.prompts["query"] == "为这个句子生成表示以用于检索相关文章："
    assert model.prompts["document"] == ""
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": {"query": "Q: "}}))
    assert st_npu.SentenceTransformer(folder, device="cpu").prompts["query"] == "Q: "


def test_fixture_shapes_are_listed_without_importing_torch():
    code = ("import sys\nfrom st_npu.testing import fixtures\ntry:\n    fixtures.main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split()[-2:] == ["False", "False"]
    assert all(name in result.stdout for name in fixtures.SHAPES)
