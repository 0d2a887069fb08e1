"""The Ray engine on a local two-node Ray cluster (loopback only), each node with one emulated NPU: equal to the
local engine, shards written by the actors (not the driver), one model load per actor, a killed actor and a
removed node costing no row, input and output on an S3 server (moto, loopback), a progress bar moving by batch,
duplicate ids refused."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_emulator
from s3_server import CREDENTIALS, s3  # noqa: F401 - s3 is the server fixture
from test_corpus_fixes import _RecordingBar

ray = pytest.importorskip("ray", reason='the Ray engine needs Ray: pip install "st-npu[ray]"')
pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.corpus.encoder import ModelSettings  # noqa: E402
from st_npu.corpus.ray_engine import Embedder, ShardWriter, embed_dataset  # noqa: E402

pytestmark = needs_emulator
# Ray's workers cannot import this test module: its test classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROWS = 600
NODE = {"num_cpus": 1, "resources": {"NPU": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False}


@pytest.fixture(scope="module")
def cluster():
    """A fresh two-node Ray (never one already running on the machine), one NPU per node, on 127.0.0.1 only."""
    # ray.init turns 127.0.0.1 into the host's address unless Ray is told it runs on one machine; its nodes and
    # workers read the variable, this process the constant (Ray may have been imported before).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    loopback = pytest.MonkeyPatch()
    loopback.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"ST_NPU_EMULATE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "OMP_NUM_THREADS": "1", **CREDENTIALS}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    loopback.undo()
    del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]


def _corpus(path: Path, rows: int) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = np.random.default_rng(1)
    path.write_text("".join(" ".join(rng.choice(words, rng.integers(0, 9))) + "\n" for _ in range(rows)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("ray") / "corpus.txt", ROWS)


@pytest.fixture(scope="module")
def local_output(tiny_cls, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    embed_corpus(tiny_cls, corpus, out, devices=["cpu"], shard_size=100, max_seq_length=32, progress=False)
    return out


def assert_same_output(out: Path, reference: Path, rows: int = ROWS) -> None:
    table, expected = (pq.read_table(folder) for folder in (out, reference))
    assert table.column("id").to_pylist() == expected.column("id").to_pylist() == list(range(rows))
    vectors, expected_vectors = (np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
                                 for t in (table, expected))
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-6)
    manifests = [json.loads((folder / "_manifest.json").read_text()) for folder in (out, reference)]
    for key in ("settings", "model_identity", "input", "model"):
        assert manifests[0][key] == manifests[1][key]
    assert [(s["start"], s["end"], s["count"]) for s in manifests[0]["shards"].values()] == \
        [(s["start"], s["end"], s["count"]) for s in manifests[1]["shards"].values()]


def _refuse_writes(*args, **kwargs):
    raise AssertionError("the driver wrote a shard")


def test_two_nodes_equal_the_local_engine_with_shards_written_by_the_actors(cluster, tiny_cls, corpus, local_output,
                                                                            tmp_path, monkeypatch):
    # The driver's own copies of the shard writer fail: every shard must come from an actor's process.
    monkeypatch.setattr("st_npu.corpus.workers.write_shard", _refuse_writes)
    monkeypatch.setattr("st_npu.corpus.shards.write_shard", _refuse_writes)
    summary = embed_corpus(tiny_cls, corpus, tmp_path / "out", engine="ray", shard_size=100, max_seq_length=32,
                           progress=False)
    assert summary["shards"] == 6 and summary["embedded"] == ROWS
    assert_same_output(tmp_path / "out", local_output)
    actors = summary["actors"]
    assert actors and all(actor["model_loads"] == 1 for actor in actors.values())  # once per actor, per job
    assert os.getpid() not in {actor["pid"] for actor in actors.values()}
    assert sum(actor["shards"] for actor in actors.values()) == 6
    # A second run resumes: every shard is checked where it lies and none is embedded again.
    again = embed_corpus(tiny_cls, corpus, tmp_path / "out", engine="ray", shard_size=100, max_seq_length=32,
                         progress=False)
    assert again["shards_skipped"] == 6 and again["embedded"] == 0


class _ReportingEmbedder(Embedder):
    """Adds where each batch ran: the NPU Ray gave the actor, and the device the model sits on."""

    def __call__(self, batch):
        batch = super().__call__(batch)
        batch["visible"] = np.array([os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "")] * len(batch["text"]))
        batch["device"] = np.array([self.encoder.device] * len(batch["text"]))
        return batch


def test_embed_dataset_actors_hold_their_node_npu_as_npu_0(cluster, tiny_cls, corpus, monkeypatch):
    monkeypatch.setattr("st_npu.corpus.ray_engine.Embedder", _ReportingEmbedder)
    texts = corpus.read_text().splitlines()
    dataset = ray.data.from_items([{"row": row, "text": text} for row, text in enumerate(texts)], override_num_blocks=6)
    rows = embed_dataset(dataset, ModelSettings(str(tiny_cls), max_seq_length=32), actors=2,
                         cpus_per_actor=0.5).take_all()
    assert len(rows) == len(texts)
    assert {row["device"] for row in rows} == {"npu:0"} and {row["visible"] for row in rows} == {"0"}


class _DyingOnceWriter(ShardWriter):
    """Kills its own actor (SIGKILL) on its first shard, once per test (a marker file says it happened)."""

    marker = ""

    def __call__(self, batch):
        try:
            descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return super().__call__(batch)
        os.close(descriptor)
        os.kill(os.getpid(), signal.SIGKILL)


def test_an_actor_killed_mid_job_costs_no_row(cluster, tiny_cls, corpus, local_output, monkeypatch, tmp_path):
    marker = tmp_path / "killed"
    monkeypatch.setattr(_DyingOnceWriter, "marker", str(marker))
    monkeypatch.setattr("st_npu.corpus.ray_engine.ShardWriter", _DyingOnceWriter)
    summary = embed_corpus(tiny_cls, corpus, tmp_path / "out", engine="ray", shard_size=100, max_seq_length=32,
                           progress=False)
    assert marker.exists(), "no actor was killed"
    assert summary["embedded"] == ROWS
    assert_same_output(tmp_path / "out", local_output)


def test_a_node_removed_mid_job_costs_no_row(cluster, tiny_cls, tmp_path):
    rows = 3000
    source = _corpus(tmp_path / "big.txt", rows)
    out = tmp_path / "out"
    results: dict = {}
    job = threading.Thread(target=lambda: results.update(embed_corpus(
        tiny_cls, source, out, engine="ray", shard_size=100, max_seq_length=32, progress=False)))
    job.start()
    deadline = time.monotonic() + 300
    while not (out / "_manifest.json").is_file() or len(json.loads((out / "_manifest.json").read_text())["shards"]) < 3:
        assert job.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    worker = next(iter(cluster.worker_nodes))
    cluster.remove_node(worker, allow_graceful=False)
    job.join(timeout=300)
    cluster.add_node(**NODE)  # for any test after this one
    assert not job.is_alive() and results, "the job did not finish after losing a node"
    assert results["embedded"] == rows
    # Whether the removed node's actor had written a shard yet is Ray's scheduling (one actor may take every shard
    # while the other still loads its model); either way the job lost a node of its pool in the middle of its work.
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == list(range(rows))  # every id once


def test_a_bad_row_stops_the_ray_job_naming_file_and_line(cluster, tiny_cls, tmp_path):
    from st_npu.files.inputs import InputError

    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(InputError, match=r"in.jsonl: line 2: has no field 'text'"):
        embed_corpus(tiny_cls, source, tmp_path / "out", engine="ray", progress=False)


def test_a_bucket_in_and_another_out_equal_a_local_run_and_the_bar_moves_by_batch(cluster, tiny_cls, s3, tmp_path,
                                                                                  monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    texts = _corpus(tmp_path / "texts.txt", 200).read_text().splitlines()
    (source / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:120]))
    pq.write_table(pyarrow.table({"text": texts[120:]}), source / "b.parquet", row_group_size=16)
    filesystem = s3.filesystem()
    for path in source.iterdir():
        with filesystem.open_output_stream(f"corpus/ray/{path.name}") as handle:
            handle.write(path.read_bytes())
    settings = {"shard_size": 50, "batch_size": 8, "max_seq_length": 32}
    embed_corpus(tiny_cls, source, tmp_path / "local", devices=["cpu"], progress=False, **settings)
    monkeypatch.setattr("tqdm.auto.tqdm", _RecordingBar)
    summary = embed_corpus(tiny_cls, "s3://corpus/ray", "s3://vectors/ray", engine="ray", storage_options=s3.options,
                           **settings)
    assert summary["embedded"] == 200 and len(summary["actors"]) >= 1
    objects = s3.objects("vectors/ray")
    assert sorted(objects) == ["_manifest.json", *(f"part-{index:05d}.parquet" for index in range(4))]
    table = pq.read_table("vectors/ray", filesystem=filesystem)
    expected = pq.read_table(tmp_path / "local")
    assert table.column("id").to_pylist() == expected.column("id").to_pylist() == list(range(200))
    np.testing.assert_allclose(*(np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
                                 for t in (table, expected)), atol=1e-6)
    manifests = [json.loads(objects["_manifest.json"]), json.loads((tmp_path / "local" / "_manifest.json").read_text())]
    for key in ("settings", "model_identity", "input", "model"):
        assert manifests[0][key] == manifests[1][key]
    # The actors' vectors (on the emulated npu) equal the CPU's to 1e-6, not to the bit: checksums may differ.
    assert [(s["start"], s["end"], s["count"]) for s in manifests[0]["shards"].values()] == \
        [(s["start"], s["end"], s["count"]) for s in manifests[1]["shards"].values()]
    # 50-row shards embedded 32 rows at a time (4 batches of 8): two moves per shard, reported by the actors.
    bar = _RecordingBar.bars[-1]
    moves = [rows for rows in bar.updates if rows > 0]
    assert bar.total == 200 and sum(bar.updates) == 200 and len(moves) >= 2 * 4 and max(moves) == 32


def test_a_duplicate_id_stops_the_ray_job_naming_both_rows(cluster, tiny_cls, tmp_path):
    from st_npu.files.inputs import InputError

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"doc": f"d{7 if row == 120 else row}", "text": f"text {row}"}) + "\n"
                              for row in range(150)))
    with pytest.raises(InputError, match=r"in.jsonl: line 121: id 'd7' is also the id of row 7 .*this is row 120"):
        embed_corpus(tiny_cls, source, tmp_path / "out", engine="ray", id_field="doc", shard_size=100,
                     max_seq_length=32, progress=False)
