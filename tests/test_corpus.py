"""The corpus job (st_npu.corpus, `st-npu embed-corpus`): formats, ids, resume, kills, devices, bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, needs_emulator, run_cli

pyarrow = pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from st_npu import SentenceTransformer  # noqa: E402
from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.files.inputs import InputError  # noqa: E402

TEXTS = ["The cat sat on the mat.", "", "北京是中国的首都。", "A much longer sentence " * 20, "x", "  ", "end"]


def read_output(folder: Path) -> tuple[list, np.ndarray, dict]:
    table = pq.read_table(sorted(folder.glob("part-*.parquet")))
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)) if table.num_rows else np.zeros((0,))
    return table.column("id").to_pylist(), vectors, table


def expected(model_path: Path, texts: list[str]) -> np.ndarray:
    return SentenceTransformer(str(model_path), device="cpu").encode(texts, convert_to_numpy=True)


def write_text_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


def test_txt_rows_and_ids_match_model_encode(tiny_cls, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    summary = embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], shard_size=3, progress=False)
    ids, vectors, table = read_output(tmp_path / "out")
    assert ids == list(range(len(TEXTS)))  # a blank line is a row, embedded as ""
    np.testing.assert_allclose(vectors, expected(tiny_cls, TEXTS), atol=1e-6)
    assert table.schema.field("embedding").type == pyarrow.list_(pyarrow.float32(), 32)
    assert summary["shards"] == 3 and summary["rows"] == len(TEXTS)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [(s["start"], s["end"], s["count"]) for s in manifest["shards"].values()] == [(0, 3, 3), (3, 6, 3), (6, 7, 1)]
    assert manifest["model"]["normalized"] is True and manifest["model"]["max_seq_length"] == 512
    assert "model.safetensors" in manifest["model_identity"]["files"]


def test_skip_empty_keeps_row_numbers(tiny_cls, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    summary = embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], skip_empty=True, progress=False)
    ids, vectors, _ = read_output(tmp_path / "out")
    assert ids == [0, 2, 3, 4, 6] and summary["empty_skipped"] == 2
    np.testing.assert_allclose(vectors, expected(tiny_cls, [TEXTS[i] for i in ids]), atol=1e-6)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "tsv", "folder"])
def test_columnar_and_json_formats_with_ids_and_kept_columns(tiny_cls, tmp_path, kind):
    records = [{"doc": f"d{i}", "body": text, "lang": "zh" if "京" in text else "en"} for i, text in enumerate(TEXTS)]
    table = pyarrow.Table.from_pylist(records)
    if kind in ("jsonl", "folder"):
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        if kind == "folder":  # two files read in sorted order, rows numbered over both
            (tmp_path / "in").mkdir()
            (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
            pq.write_table(table.slice(4), tmp_path / "in" / "b.parquet")
            source = tmp_path / "in"
        else:
            source = tmp_path / "in.jsonl"
            source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "parquet":
        source = tmp_path / "in.parquet"
        pq.write_table(table, source, row_group_size=2)
    else:
        source = tmp_path / f"in.{kind}"
        pyarrow.csv.write_csv(table, source, pyarrow.csv.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], text_field="body", id_field="doc",
                 keep=["lang"], shard_size=4, progress=False)
    ids, vectors, out = read_output(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(len(TEXTS))]
    assert out.column("lang").to_pylist() == [record["lang"] for record in records]
    np.testing.assert_allclose(vectors, expected(tiny_cls, TEXTS), atol=1e-6)


def test_float16_output(tiny_cls, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], output_dtype="float16", progress=False)
    _, vectors, table = read_output(tmp_path / "out")
    assert table.schema.field("embedding").type == pyarrow.list_(pyarrow.float16(), 32)
    np.testing.assert_allclose(vectors.astype(np.float32), expected(tiny_cls, TEXTS), atol=2e-3)


def test_resume_skips_checked_shards_and_redoes_a_damaged_one(tiny_cls, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    out = tmp_path / "out"
    embed_corpus(tiny_cls, source, out, devices=["cpu"], shard_size=2, progress=False)
    before = {path.name: path.read_bytes() for path in out.glob("part-*")}
    (out / "part-00001.parquet").write_bytes(b"damaged")
    summary = embed_corpus(tiny_cls, source, out, devices=["cpu"], shard_size=2, progress=False)
    assert (summary["shards_skipped"], summary["shards_done"]) == (3, 1)
    assert {path.name: path.read_bytes() for path in out.glob("part-*")} == before


def test_a_different_job_is_refused_naming_what_differs(tiny_cls, tiny_mean, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    out = tmp_path / "out"
    embed_corpus(tiny_cls, source, out, devices=["cpu"], progress=False)
    with pytest.raises(Exception, match="output_dtype: 'float32' there, 'float16' now"):
        embed_corpus(tiny_cls, source, out, devices=["cpu"], output_dtype="float16", progress=False)
    with pytest.raises(Exception, match="prompt_name"):
        embed_corpus(tiny_cls, source, out, devices=["cpu"], prompt_name="query", progress=False)
    with pytest.raises(Exception, match="model files: different content: 1_Pooling/config.json"):
        embed_corpus(tiny_mean, source, out, devices=["cpu"], progress=False)
    write_text_file(source, TEXTS[:3])
    with pytest.raises(Exception, match="input files: in.txt differ"):
        embed_corpus(tiny_cls, source, out, devices=["cpu"], progress=False)
    summary = embed_corpus(tiny_cls, source, out, devices=["cpu"], overwrite=True, progress=False)
    assert summary["rows"] == 3 and read_output(out)[0] == [0, 1, 2]


@pytest.mark.parametrize("content, field, message", [
    (b'{"text": "a"}\n{"body": "b"}\n', "text", r"in.jsonl: line 2: has no field 'text'"),
    (b'{"text": "a"}\n{"text": 5}\n', "text", r"in.jsonl: line 2: field 'text' is int"),
    (b'{"text": "a"}\n{"text": \n', "text", r"in.jsonl: line 2: is malformed JSON"),
    (b'ok\nbad \xff here\n', None, r"in.txt: line 2: is not valid UTF-8 \(invalid start byte at byte 7 of the file\)"),
    (b"", None, r"the input is empty"),
])
def test_bad_lines_name_file_line_and_problem(tiny_cls, tmp_path, content, field, message):
    source = tmp_path / ("in.jsonl" if field else "in.txt")
    source.write_bytes(content)
    with pytest.raises(InputError, match=message):
        embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], progress=False)
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_a_missing_column_is_named(tiny_cls, tmp_path, suffix):
    source = tmp_path / f"in.{suffix}"
    table = pyarrow.table({"body": ["a", "b"]})
    pq.write_table(table, source) if suffix == "parquet" else pyarrow.csv.write_csv(table, source)
    with pytest.raises(InputError, match=rf"in.{suffix} has no column 'text' \(columns: 'body'\)"):
        embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], progress=False)


def test_on_bad_row_skip_writes_rejects(tiny_cls, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "a"}\n{"body": "b"}\n{"text": null}\nnot json\n{"text": "e"}\n')
    summary = embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], on_bad_row="skip", progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "_rejects.jsonl").read_text().splitlines()]
    assert [reject["row"] for reject in rejects] == [1, 2, 3] and summary["rejects"] == 3
    assert "has no field 'text'" in rejects[0]["reason"] and "malformed JSON" in rejects[2]["reason"]
    assert read_output(tmp_path / "out")[0] == [0, 4]


def test_an_error_after_some_shards_keeps_them(tiny_cls, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"oops": 1}\n')
    with pytest.raises(InputError, match="line 4"):
        embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], shard_size=2, progress=False)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert list(manifest["shards"]) == ["00000"] and (tmp_path / "out" / "part-00000.parquet").is_file()


# --- killed and interrupted jobs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_2k(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(2000)]
    return write_text_file(tmp_path_factory.mktemp("corpus") / "corpus.txt", texts)


@pytest.fixture(scope="module")
def uninterrupted(tiny_cls, corpus_2k, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    result = run_cli("embed-corpus", str(corpus_2k), "--model", str(tiny_cls), "--device", "cpu", "--output", str(out),
                     "--shard-size", "100", timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_job_resumes_to_the_uninterrupted_output(tiny_cls, corpus_2k, uninterrupted, tmp_path, how):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "st_npu", "embed-corpus", str(corpus_2k), "--model", str(tiny_cls), "--device",
               "cpu", "--output", str(out), "--shard-size", "100", "--summary-json", str(tmp_path / "summary.json")]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _finished_shards(out) < 3:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    job.send_signal(how)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130), stderr.decode()[-2000:]
    finished = _finished_shards(out)
    assert finished < 20, "the job finished before the signal: nothing was interrupted"
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shards_skipped"] == finished and summary["shards_done"] == 20 - finished
    ids, _, table = read_output(out)
    assert ids == list(range(2000))  # each id exactly once
    whole_table = read_output(uninterrupted)[2]
    assert table.equals(whole_table)
    for name in sorted(p.name for p in uninterrupted.glob("part-*")):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes()
    shards = lambda folder: json.loads((folder / "_manifest.json").read_text())["shards"]  # noqa: E731
    assert shards(out) == shards(uninterrupted)


def _finished_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "_manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# --- several devices ----------------------------------------------------------------------------------------


@needs_emulator
def test_two_emulated_npus_both_work(tiny_cls, corpus_2k, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the workers size their threads themselves
    summary = embed_corpus(tiny_cls, corpus_2k, tmp_path / "out", devices=["npu:0", "npu:1"], shard_size=200,
                           max_seq_length=32, progress=False)
    assert set(summary["devices"]) == {"npu:0", "npu:1"}
    assert all(figures["ops"] > 0 and figures["shards"] > 0 for figures in summary["devices"].values())
    # Each worker runs torch on its share of the cores, not one thread per core of the host.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {figures["threads"] for figures in summary["devices"].values()} == {share}
    ids, vectors, _ = read_output(tmp_path / "out")
    assert ids == list(range(2000))
    model = SentenceTransformer(str(tiny_cls), device="cpu")
    model.max_seq_length = 32
    np.testing.assert_allclose(vectors, model.encode(corpus_2k.read_text().splitlines()), atol=1e-6)


@needs_emulator
def test_a_worker_killed_mid_job_has_its_shard_redone(tiny_cls, corpus_2k, tmp_path, capfd):
    out = tmp_path / "out"
    # 20,000 rows in 100 shards: the job must outlast npu:1's warm-up by more than a blink, to be killed mid-way.
    source = tmp_path / "corpus_20k.txt"
    source.write_text(corpus_2k.read_text() * 10)
    results = {}
    job = threading.Thread(target=lambda: results.update(embed_corpus(
        tiny_cls, source, out, devices=["npu:0", "npu:1"], shard_size=200, max_seq_length=32, progress=False)))
    job.start()
    deadline = time.monotonic() + 300
    err = ""
    # npu:1 holds a shard once its warm-up is over and the parent has seen it ready (npu:0 may have finished a
    # few shards by then): wait for its warm-up line, then for two more shards.
    while "st_npu warm-up: " not in err or " on npu:1 in " not in err:
        assert job.is_alive() and time.monotonic() < deadline
        err += capfd.readouterr().err
        time.sleep(0.05)
    target = _finished_shards(out) + 2
    while _finished_shards(out) < target:
        assert job.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    victim = next(p for p in multiprocessing.active_children() if p.name == "st-npu-corpus-npu:1")
    os.kill(victim.pid, signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive() and results, "the job did not finish after losing a worker"
    assert results["shards"] == 100 and _finished_shards(out) == 100
    assert "the worker on npu:1 died (killed by SIGKILL); its shard" in capfd.readouterr().err
    # npu:0 finished the job; whether npu:1 had completed a shard before it died is a matter of timing.
    assert "npu:0" in results["devices"] and sum(d["shards"] for d in results["devices"].values()) == 100
    ids, vectors, _ = read_output(out)
    assert ids == list(range(20000))  # the dead worker's shard was redone once, nothing written twice
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_the_command_prints_a_summary(tiny_cls, tmp_path):
    source = write_text_file(tmp_path / "in.txt", TEXTS)
    result = run_cli("embed-corpus", str(source), "--model", str(tiny_cls), "--device", "cpu", "--output",
                     str(tmp_path / "out"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "rows:      7 (7 embedded now" in result.stdout and "shards:    1 (1 done now" in result.stdout
    again = run_cli("embed-corpus", str(source), "--model", str(tiny_cls), "--device", "cpu", "--output",
                    str(tmp_path / "out"), "--output-dtype", "float16", timeout=300)
    assert again.returncode == 2 and "output_dtype: 'float32' there, 'float16' now" in again.stderr
