"""Compact corpus outputs: int8/uint8 with one set of ranges for the whole job, binary/ubinary, truncate_dim."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

pyarrow = pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.parquet as pq  # noqa: E402
from sentence_transformers import quantize_embeddings  # noqa: E402

from st_npu import SentenceTransformer  # noqa: E402
from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.errors import UsageError  # noqa: E402

ROWS = 1500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    path = tmp_path_factory.mktemp("compact") / "in.txt"
    path.write_text("".join(" ".join(rng.choice(words, rng.integers(1, 10))) + "\n" for _ in range(ROWS)))
    return path


@pytest.fixture(scope="module")
def floats(tiny_cls, corpus) -> np.ndarray:
    return SentenceTransformer(str(tiny_cls), device="cpu").encode(corpus.read_text().splitlines())


def vectors(folder: Path) -> np.ndarray:
    return np.stack(pq.read_table(folder).column("embedding").to_numpy(zero_copy_only=False))


def checksums(folder: Path) -> dict[str, str]:
    shards = json.loads((folder / "_manifest.json").read_text())["shards"]
    return {name: shard["sha256"] for name, shard in shards.items()}


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_int8_uses_one_range_for_every_shard_whatever_order_they_ran_in(tiny_cls, corpus, floats, tmp_path, dtype):
    out = tmp_path / "out"
    embed_corpus(tiny_cls, corpus, out, devices=["cpu"], shard_size=300, output_dtype=dtype, progress=False)
    ranges = np.array(json.loads((out / "_manifest.json").read_text())["ranges"], dtype=np.float32)
    # The ranges of the first 1000 rows, fixed once: every shard equals the whole corpus quantised at once.
    np.testing.assert_allclose(ranges, [floats[:1000].min(axis=0), floats[:1000].max(axis=0)], atol=1e-6)
    stored = vectors(out)
    assert stored.dtype == np.dtype(dtype) and stored.shape == floats.shape
    assert np.abs(stored.astype(int) - quantize_embeddings(floats, dtype, ranges=ranges).astype(int)).max() <= 1
    # Shards redone later (last first) are byte for byte the ones that ran first.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for index in (4, 0, 2):
        (again / f"part-{index:05d}.parquet").unlink()
    summary = embed_corpus(tiny_cls, corpus, again, devices=["cpu"], shard_size=300, output_dtype=dtype,
                           progress=False)
    assert summary["shards_done"] == 3 and checksums(again) == checksums(out)
    # Stock quantisation without fixed ranges takes them from each batch: shards would not be comparable.
    assert not np.array_equal(quantize_embeddings(floats[:300], dtype)[:10], quantize_embeddings(floats, dtype)[:10])


def test_given_int8_ranges_are_used_and_recorded(tiny_cls, corpus, floats, tmp_path):
    ranges = np.stack([np.full(32, -0.5), np.full(32, 0.5)]).astype(np.float32)
    embed_corpus(tiny_cls, corpus, tmp_path / "out", devices=["cpu"], output_dtype="int8", int8_ranges=ranges,
                 progress=False)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["ranges"] == ranges.tolist()
    expected = quantize_embeddings(floats, "int8", ranges=ranges).astype(int)
    assert np.abs(vectors(tmp_path / "out").astype(int) - expected).max() <= 1
    with pytest.raises(UsageError, match=r"int8_ranges must be a \(2, dimension\)"):
        embed_corpus(tiny_cls, corpus, tmp_path / "bad", devices=["cpu"], output_dtype="int8", int8_ranges=ranges[0])
    with pytest.raises(UsageError, match="int8_ranges have 8 dimensions"):
        embed_corpus(tiny_cls, corpus, tmp_path / "bad", devices=["cpu"], output_dtype="int8",
                     int8_ranges=ranges[:, :8], progress=False)


@pytest.mark.parametrize("dtype", ["binary", "ubinary"])
def test_binary_packs_the_signs(tiny_cls, corpus, floats, tmp_path, dtype):
    embed_corpus(tiny_cls, corpus, tmp_path / "out", devices=["cpu"], shard_size=400, output_dtype=dtype,
                 progress=False)
    stored = vectors(tmp_path / "out")
    assert stored.shape == (ROWS, 4)  # 32 dimensions, 8 to a byte
    np.testing.assert_array_equal(stored, quantize_embeddings(floats, dtype))


def test_truncate_dim_keeps_the_first_dimensions_as_stock_does(tiny_cls, corpus, tmp_path):
    embed_corpus(tiny_cls, corpus, tmp_path / "out", devices=["cpu"], truncate_dim=16, progress=False)
    stock = SentenceTransformer(str(tiny_cls), device="cpu").encode(corpus.read_text().splitlines(), truncate_dim=16)
    np.testing.assert_allclose(vectors(tmp_path / "out"), stock, atol=1e-6)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["model"]["dimension"] == 16


class _FakeIndex:
    """Stands in for a FAISS index: keeps its dimension and what was added."""

    def __init__(self, dimension):
        self.dimension, self.added = dimension, None

    def add(self, vectors):
        self.added = vectors


def readme_faiss_snippet() -> str:
    readme = (REPO / "docs" / "corpus.md").read_text(encoding="utf-8")
    section = readme[readme.index("Into FAISS"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("dtype", ["float16", "int8", "uint8", "binary", "ubinary"])
def test_readme_faiss_snippet_gives_faiss_the_vectors(tiny_cls, corpus, floats, tmp_path, monkeypatch, dtype):
    embed_corpus(tiny_cls, corpus, tmp_path / "passages.emb", devices=["cpu"], output_dtype=dtype, progress=False)
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=_FakeIndex, IndexBinaryFlat=_FakeIndex))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(readme_faiss_snippet(), scope)  # noqa: S102 - README's code, as a user would paste it
    index = scope["index"]
    assert scope["ids"].tolist() == list(range(ROWS))
    if "binary" in dtype:
        assert index.dimension == 32 and index.added.dtype == np.uint8
        np.testing.assert_array_equal(index.added, np.packbits(floats > 0, axis=-1))
    else:
        assert index.dimension == 32 and index.added.dtype == np.float32
        # int8: back within one step of each dimension's range (the first 1000 rows' ranges; later rows may be
        # outside them, and are clipped)
        low, high = floats[:1000].min(axis=0), floats[:1000].max(axis=0)
        tolerance = 2e-3 if dtype == "float16" else ((high - low) / 255).max() + 1e-6
        inside = ((floats >= low) & (floats <= high)).all(axis=1)
        assert np.abs(index.added[inside] - floats[inside]).max() <= tolerance


def test_the_command_takes_truncate_dim_and_int8_ranges_from_a_file(tiny_cls, corpus, tmp_path):
    ranges = np.stack([np.full(16, -0.5), np.full(16, 0.5)]).astype(np.float32)
    np.save(tmp_path / "ranges.npy", ranges)
    result = run_cli("embed-corpus", str(corpus), "--model", str(tiny_cls), "--device", "cpu", "--output",
                     str(tmp_path / "out"), "--truncate-dim", "16", "--output-dtype", "int8", "--int8-ranges",
                     str(tmp_path / "ranges.npy"), timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["ranges"] == ranges.tolist() and manifest["settings"]["truncate_dim"] == 16
    assert vectors(tmp_path / "out").shape == (ROWS, 16)
