"""The Ray engine on a local Ray (loopback only) with 2 emulated NPUs: one actor per NPU, each with the emulator."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_emulator

ray = pytest.importorskip("ray", reason='the Ray engine needs Ray: pip install "st-npu[ray]"')
pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.parquet as pq  # noqa: E402

from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.corpus.encoder import ModelSettings  # noqa: E402
from st_npu.corpus.ray_engine import Embedder, embed_dataset  # noqa: E402

pytestmark = needs_emulator
# Ray's workers cannot import this test module: its test classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROWS = 600


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"ST_NPU_EMULATE": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("ray") / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(words, rng.integers(0, 9))) + "\n" for _ in range(ROWS)))
    return path


@pytest.fixture(scope="module")
def local_output(tiny_cls, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    embed_corpus(tiny_cls, corpus, out, devices=["cpu"], shard_size=100, max_seq_length=32, progress=False)
    return out


def assert_same_output(out: Path, reference: Path) -> None:
    table, expected = (pq.read_table(sorted(folder.glob("part-*.parquet"))) for folder in (out, reference))
    assert table.column("id").to_pylist() == expected.column("id").to_pylist() == list(range(ROWS))
    vectors, expected_vectors = (np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in (table, expected))
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-6)
    manifests = [json.loads((folder / "_manifest.json").read_text()) for folder in (out, reference)]
    for key in ("settings", "model_identity", "input", "model"):
        assert manifests[0][key] == manifests[1][key]
    assert [(s["start"], s["end"], s["count"]) for s in manifests[0]["shards"].values()] == \
        [(s["start"], s["end"], s["count"]) for s in manifests[1]["shards"].values()]


def test_ray_on_two_emulated_npus_equals_the_local_engine(local_ray, tiny_cls, corpus, local_output, tmp_path):
    summary = embed_corpus(tiny_cls, corpus, tmp_path / "out", engine="ray", shard_size=100, max_seq_length=32,
                           progress=False)
    assert summary["shards"] == 6 and summary["embedded"] == ROWS
    assert_same_output(tmp_path / "out", local_output)


class _ReportingEmbedder(Embedder):
    """Adds where each batch ran: the NPU Ray gave the actor, and the device the model sits on."""

    def __call__(self, batch):
        batch = super().__call__(batch)
        batch["visible"] = np.array([os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "")] * len(batch["text"]))
        batch["device"] = np.array([self.encoder.device] * len(batch["text"]))
        return batch


@ray.remote
class _VisibleNpu:
    def visible(self) -> str:
        return os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "")


class _DyingOnceEmbedder(Embedder):
    """Kills its own actor (SIGKILL) on its first batch, once per test (a marker file says it happened)."""

    marker = ""

    def __call__(self, batch):
        try:
            descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return super().__call__(batch)
        os.close(descriptor)
        os.kill(os.getpid(), signal.SIGKILL)


def _dataset(corpus: Path):
    texts = corpus.read_text().splitlines()
    return ray.data.from_items([{"row": row, "text": text} for row, text in enumerate(texts)], override_num_blocks=6)


def test_each_actor_holds_one_emulated_npu_as_npu_0(local_ray, tiny_cls, corpus, monkeypatch):
    monkeypatch.setattr("st_npu.corpus.ray_engine.Embedder", _ReportingEmbedder)
    settings = ModelSettings(str(tiny_cls), max_seq_length=32)
    rows = embed_dataset(_dataset(corpus), settings, actors=2).take_all()
    assert len(rows) == len(corpus.read_text().splitlines())
    assert {row["device"] for row in rows} == {"npu:0"}
    # Which actor takes which block is Ray's choice (one may take them all), so each row says only that its actor
    # saw one of the two NPUs; two actors alive at once must hold different ones.
    assert {row["visible"] for row in rows} <= {"0", "1"}
    holders = [_VisibleNpu.options(resources={"NPU": 1}, num_cpus=0).remote() for _ in range(2)]
    try:
        assert sorted(ray.get([holder.visible.remote() for holder in holders], timeout=120)) == ["0", "1"]
    finally:
        for holder in holders:  # give the NPUs back to the tests after this one
            ray.kill(holder)


def test_one_actor_killed_mid_job_still_completes(local_ray, tiny_cls, corpus, local_output, monkeypatch, tmp_path):
    marker = tmp_path / "killed"
    monkeypatch.setattr(_DyingOnceEmbedder, "marker", str(marker))
    monkeypatch.setattr("st_npu.corpus.ray_engine.Embedder", _DyingOnceEmbedder)
    summary = embed_corpus(tiny_cls, corpus, tmp_path / "out", engine="ray", shard_size=100, max_seq_length=32,
                           progress=False)
    assert marker.exists(), "no actor was killed"
    assert summary["embedded"] == ROWS
    assert_same_output(tmp_path / "out", local_output)
