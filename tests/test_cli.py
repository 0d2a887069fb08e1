"""The st-npu command: embed and info, run as a user runs them (subprocesses, emulated npu where needed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import needs_emulator, run_cli

import st_npu
from st_npu import cli


@needs_emulator
def test_embed_on_an_npu_in_a_subprocess(tiny_cls, tmp_path):
    output = tmp_path / "out.npy"
    result = run_cli("embed", "--model", str(tiny_cls), "--text", "Hello world", "--text", "你好", "--device", "npu:2",
                     "--output", str(output), env={"ST_NPU_EMULATE": "8"})
    assert result.returncode == 0, result.stderr
    assert "device:    npu:2" in result.stdout and "dimension: 32" in result.stdout and "count:     2" in result.stdout
    expected = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(["Hello world", "你好"])
    assert np.abs(np.load(output) - expected).max() <= 1e-6
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_embed_batch_file_with_the_seed_spellings_writes_jsonl(tiny_cls, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond line\n第三行\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    code = cli.main(["embed", "--model", str(tiny_cls), "--batch_file", str(texts), "--batch_size", "2",
                     "--device", "cpu", "--output", str(output)])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == ["first line", "second line", "第三行"]
    assert all(len(row["embedding"]) == 32 for row in rows)
    assert "count:     3" in capsys.readouterr().out


def test_embed_refuses_bad_output_before_loading(tiny_cls, tmp_path, capsys):
    assert cli.main(["embed", "--model", str(tiny_cls), "--text", "x", "--output", str(tmp_path / "out.csv")]) == 2
    assert ".npy or .jsonl" in capsys.readouterr().err
    missing = tmp_path / "no" / "out.npy"
    assert cli.main(["embed", "--model", str(tiny_cls), "--text", "x", "--output", str(missing)]) == 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    output = tmp_path / "out.npy"
    output.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with cli.atomic_file(output) as handle:
            handle.write(b"half")
            raise KeyboardInterrupt
    assert output.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_embed_names_a_missing_model_folder(tmp_path, capsys):
    assert cli.main(["embed", "--model", str(tmp_path / "nothing"), "--text", "x", "--device", "cpu"]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


@needs_emulator
def test_info_reports_versions_and_emulated_npus():
    result = run_cli("info", "--json", env={"ST_NPU_EMULATE": "8"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["devices"]["npu"] == {"count": 8, "names": ["Ascend910B3 (emulated)"] * 8, "emulated": True}
    assert report["versions"]["sentence-transformers"] and report["problems"] == []
    assert any("TASK_QUEUE_ENABLE=2" in hint for hint in report["hints"])
    tuned = json.loads(run_cli("info", "--json", env={"ST_NPU_EMULATE": "8", "TASK_QUEUE_ENABLE": "2"}).stdout)
    assert tuned["hints"] == []
    text = run_cli("info", env={"ST_NPU_EMULATE": "2"}).stdout
    assert "sentence-transformers" in text and "npu" in text and "problems               none" in text
