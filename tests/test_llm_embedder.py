"""The seed port's LLMEmbedder interface on an llm-embedder-shaped model (random weights)."""

from __future__ import annotations

import numpy as np
import pytest

import st_npu
from st_npu.loading.folder import spec_by_name

SPEC = spec_by_name("BAAI/llm-embedder")


@pytest.fixture(scope="module")
def embedder(llm_like):
    return st_npu.LLMEmbedder(model_path=str(llm_like), device="cpu")


def test_encode_shapes_like_the_seed(embedder):
    assert embedder.encode(["Hello world", "Another sentence"]).shape == (2, 768)
    single = embedder.encode("Hello world")
    assert isinstance(single, np.ndarray) and single.shape == (768,)
    assert np.allclose(np.linalg.norm(single), 1.0, atol=1e-5)


@pytest.mark.parametrize("task", list(SPEC["instructions"]))
def test_queries_and_keys_carry_the_task_instruction(embedder, task):
    query = "how do I reset my password?"
    expected = embedder.model.encode(SPEC["instructions"][task]["query"] + query)
    assert np.abs(embedder.encode_queries(query, task=task) - expected).max() <= 1e-6
    expected = embedder.model.encode([SPEC["instructions"][task]["key"] + query])
    assert np.abs(embedder.encode_keys([query], task=task) - expected).max() <= 1e-6


def test_query_length_is_capped_at_256_tokens_and_restored(embedder):
    long_query = "word " * 600
    manual = embedder.model.encode(SPEC["instructions"]["qa"]["query"] + long_query)
    assert np.abs(embedder.encode_queries(long_query) - manual).max() > 1e-4  # 256 tokens, not 512
    assert embedder.model.max_seq_length == 512


def test_unknown_task_lists_the_six(embedder):
    with pytest.raises(ValueError, match="qa, convsearch, chat, lrlm, icl, tool"):
        embedder.encode_queries("x", task="search")
