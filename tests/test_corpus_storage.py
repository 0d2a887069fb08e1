"""The corpus job on object storage, against a real S3 server on 127.0.0.1 (moto): input from one bucket, shards and
manifest to another, equal to a run on local paths; a killed job rerun to exactly the objects of a whole run; a
complete job answered from its manifest; wrong endpoints and missing buckets as one-line errors before any model
loads; credentials never written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

pyarrow = pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.parquet as pq  # noqa: E402

from s3_server import CREDENTIALS, free_port, s3  # noqa: E402,F401 - s3 is the server fixture
from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.corpus.reader import input_files  # noqa: E402
from st_npu.corpus.storage import StorageError, locate  # noqa: E402
from st_npu.files.inputs import InputError  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(0, 12))) for _ in range(count)]


def upload(s3, key: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(key) as handle:
        handle.write(data)


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory) -> Path:
    """A JSONL and a Parquet file, in bucket ``corpus`` under ``in/`` and in a local folder alike."""
    folder = tmp_path_factory.mktemp("in")
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts(130, 1)))
    pq.write_table(pyarrow.table({"text": texts(70, 2)}), folder / "b.parquet", row_group_size=20)
    for path in folder.iterdir():
        upload(s3, f"corpus/in/{path.name}", path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def local_run(tiny_cls, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    embed_corpus(tiny_cls, corpus, out, devices=["cpu"], shard_size=50, progress=False)
    return out


def assert_equal_runs(table, manifest: dict, reference: Path) -> None:
    expected = pq.read_table(reference)
    assert table.column("id").to_pylist() == expected.column("id").to_pylist() == list(range(200))
    vectors, expected_vectors = (np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in (table, expected))
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-6)
    reference_manifest = json.loads((reference / "_manifest.json").read_text())
    for key in ("settings", "model_identity", "input", "model", "shards"):
        assert manifest[key] == reference_manifest[key]


class _NoModel:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the model was loaded")


def test_local_engine_reads_one_bucket_and_writes_another_as_on_local_paths(tiny_cls, corpus, local_run, s3,
                                                                            monkeypatch):
    summary = embed_corpus(tiny_cls, "s3://corpus/in", "s3://vectors/local", devices=["cpu"], shard_size=50,
                           storage_options=s3.options, progress=False)
    objects = s3.objects("vectors/local")
    # Exactly the shards and the manifest: no temporary key, no folder marker, no write check left behind.
    assert sorted(objects) == ["_manifest.json", *(f"part-{index:05d}.parquet" for index in range(4))]
    table = pq.read_table("vectors/local", filesystem=s3.filesystem())
    manifest = json.loads(objects["_manifest.json"])
    assert_equal_runs(table, manifest, local_run)
    assert summary["output"] == "s3://vectors/local" and summary["embedded"] == 200
    secrets = (CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"], s3.endpoint)
    assert not any(secret in objects["_manifest.json"].decode() for secret in secrets)

    # Rerunning the complete job answers from the manifest (checksums checked) without loading the model.
    monkeypatch.setattr("st_npu.corpus.encoder.ShardEncoder.__init__", _NoModel.__init__)
    again = embed_corpus(tiny_cls, "s3://corpus/in", "s3://vectors/local", devices=["cpu"], shard_size=50,
                         storage_options=s3.options, progress=False)
    assert (again["shards_skipped"], again["embedded"], again["rows"]) == (4, 0, 200)
    assert s3.objects("vectors/local") == objects


def test_globs_and_folders_on_a_bucket_match_as_on_disk(corpus, s3):
    def names(pattern: str) -> list[str]:
        return [str(location) for location in input_files(locate(pattern, s3.options))]

    assert names("s3://corpus/in") == ["s3://corpus/in/a.jsonl", "s3://corpus/in/b.parquet"]
    assert names("s3://corpus/in/*.parquet") == ["s3://corpus/in/b.parquet"]
    # the server is shared by the session's tests (the Ray ones write under corpus/ too): stay within in/
    assert names("s3://corpus/in/**/a.*") == ["s3://corpus/in/a.jsonl"]
    assert [str(location) for location in input_files(locate(corpus / "*.jsonl"))] == [str(corpus / "a.jsonl")]


def test_a_killed_job_rerun_leaves_exactly_the_objects_of_an_uninterrupted_run(tiny_cls, s3, tmp_path):
    upload(s3, "corpus/big.txt", "".join(text + "\n" for text in texts(2000, 3)).encode())
    embed_corpus(tiny_cls, "s3://corpus/big.txt", "s3://vectors/whole", devices=["cpu"], shard_size=100,
                 storage_options=s3.options, progress=False)
    whole = s3.objects("vectors/whole")
    # The command reaches the server through AWS_ENDPOINT_URL here, as a user's shell would set it.
    command = [sys.executable, "-m", "st_npu", "embed-corpus", "s3://corpus/big.txt", "--model", str(tiny_cls),
               "--device", "cpu", "--output", "s3://vectors/killed", "--shard-size", "100"]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{s3.endpoint}"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _finished_shards(s3, "vectors/killed") < 3:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    finished = _finished_shards(s3, "vectors/killed")
    assert finished < 20, "the job finished before the signal: nothing was interrupted"
    # What a kill between a shard's copy into place and the removal of its temporary key leaves behind:
    upload(s3, "vectors/killed/.st-npu-tmp-0123456789ab-part-00003.parquet", b"PAR1 half")
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    # The server may still complete the killed job's last request (a manifest copy), so count what the rerun found.
    done_now, already = map(int, re.search(r"shards: +20 \((\d+) done now, (\d+) already done\)", rerun.stdout).groups())
    assert done_now + already == 20 and finished <= already < 20
    killed = s3.objects("vectors/killed")
    assert sorted(killed) == sorted(whole)
    assert {name: data for name, data in killed.items() if name.startswith("part-")} == \
        {name: data for name, data in whole.items() if name.startswith("part-")}
    assert json.loads(killed["_manifest.json"])["shards"] == json.loads(whole["_manifest.json"])["shards"]


def _finished_shards(s3, prefix: str) -> int:
    try:
        with s3.filesystem().open_input_stream(f"{prefix}/_manifest.json") as handle:
            return len(json.loads(handle.read())["shards"])
    except FileNotFoundError:
        return 0


def test_wrong_endpoint_and_missing_buckets_are_one_line_errors_before_the_model_loads(tiny_cls, corpus, s3,
                                                                                      monkeypatch):
    monkeypatch.setattr("st_npu.corpus.encoder.ShardEncoder.__init__", _NoModel.__init__)
    nowhere = {**s3.options, "endpoint_override": f"127.0.0.1:{free_port()}"}
    with pytest.raises(StorageError) as wrong:
        embed_corpus(tiny_cls, "s3://corpus/in", "s3://vectors/x", storage_options=nowhere, progress=False)
    assert str(wrong.value).startswith("s3://corpus/in: ") and "\n" not in str(wrong.value)
    with pytest.raises(InputError, match=r"^s3://missing/in: no such file or folder \(there is no bucket 'missing'\)$"):
        embed_corpus(tiny_cls, "s3://missing/in", "s3://vectors/x", storage_options=s3.options, progress=False)
    with pytest.raises(StorageError, match=r"^s3://missing/out: .*bucket does not exist") as missing:
        embed_corpus(tiny_cls, "s3://corpus/in", "s3://missing/out", storage_options=s3.options, progress=False)
    assert "\n" not in str(missing.value)
    assert not s3.objects("vectors/x")
    # The command says it in one line, exit status 2, with the options given as flags.
    result = run_cli("embed-corpus", "s3://corpus/in", "--model", str(tiny_cls), "--output", "s3://missing/out",
                     "--storage-option", f"endpoint_override={s3.endpoint}", "--storage-option", "scheme=http",
                     timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("st-npu embed-corpus: error: s3://missing/out: ")
    assert len(result.stderr.strip().splitlines()) == 1 and CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in result.stderr


def test_info_lists_the_filesystems_this_pyarrow_reaches(monkeypatch):
    import pyarrow.fs

    from st_npu.runtime import doctor

    assert doctor.filesystems()["s3"].startswith("yes: s3:// (AWS S3, Huawei OBS, MinIO")
    # A pyarrow built without S3 (as some conda builds are) says so on import, as pyarrow.fs does for it.
    monkeypatch.delattr(pyarrow.fs, "S3FileSystem")
    monkeypatch.setattr(pyarrow.fs, "_not_imported", [*pyarrow.fs._not_imported, "S3FileSystem"])
    report = doctor.collect()
    assert report["filesystems"]["s3"] == "no: this pyarrow build has no support for it"
    assert report["filesystems"]["gs"].startswith("yes") and "hdfs" in report["filesystems"]
    assert "  s3                   no: this pyarrow build" in doctor.format_report(report)
