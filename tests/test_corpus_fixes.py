"""What a new user hit in `st-npu embed-corpus` (issue 19): the docs' loading snippets, the progress bar, resume with
another batch size, duplicate ids (and, in test_corpus_extras.py, no pyarrow)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pyarrow = pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.parquet as pq  # noqa: E402

from st_npu.corpus import embed_corpus  # noqa: E402
from st_npu.files.inputs import InputError  # noqa: E402

TEXTS = [f"passage number {index} about {'npu ' * (index % 7)}" for index in range(300)]


def write_texts(path: Path, texts: list[str] = TEXTS) -> Path:
    path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


def loading_snippets() -> list[str]:
    """The code of docs/corpus.md's "Loading the shards": with pyarrow alone, then with pandas and polars."""
    page = (REPO / "docs" / "corpus.md").read_text(encoding="utf-8")
    section = page[page.index("## Loading the shards"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)[:2]


def test_the_loading_snippets_work_as_written(tiny_cls, tmp_path, monkeypatch):
    source = write_texts(tmp_path / "in.txt", TEXTS[:50])
    # A rejects file beside the shards too: the readers must skip it as they skip the manifest.
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:49]) + "{bad\n")
    embed_corpus(tiny_cls, tmp_path / "in.jsonl", tmp_path / "passages.emb", devices=["cpu"], shard_size=20,
                 on_bad_row="skip", progress=False)
    assert {path.name for path in (tmp_path / "passages.emb").iterdir()} >= {"_manifest.json", "_rejects.jsonl"}
    monkeypatch.chdir(tmp_path)
    pyarrow_only, with_frames = loading_snippets()
    # The first needs only what st-npu[corpus] installs: pandas and polars cannot be imported while it runs.
    with monkeypatch.context() as bare:
        bare.setitem(sys.modules, "pandas", None)
        bare.setitem(sys.modules, "polars", None)
        scope: dict = {}
        exec(pyarrow_only, scope)  # noqa: S102 - the docs' code, as a user would paste it
    assert scope["ids"] == list(range(49))
    assert scope["vectors"].shape == (49, 32) and scope["vectors"].dtype == np.float32
    pytest.importorskip("pandas", reason="the second snippet loads with pandas")
    pytest.importorskip("polars", reason='the second snippet loads with polars: pip install "st-npu[test]"')
    exec(with_frames, scope)  # noqa: S102
    assert len(scope["frame"]) == 49 and scope["frame"]["id"].tolist() == list(range(49))
    assert scope["pl_frame"].height == 49 and scope["pl_frame"]["id"].to_list() == list(range(49))
    del source


class _RecordingBar:
    """Stands in for tqdm: keeps the total and every update."""

    bars: list = []

    def __init__(self, total=None, **kwargs):
        self.total, self.updates, self.postfix = total, [], ""
        _RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, rows):
        self.updates.append(rows)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


def test_progress_moves_as_batches_finish_and_counts_only_rows_embedded_now(tiny_cls, tmp_path, monkeypatch,
                                                                           capfd):
    monkeypatch.setattr("tqdm.auto.tqdm", _RecordingBar)
    source = write_texts(tmp_path / "in.txt")
    embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], shard_size=200, batch_size=16)
    first = _RecordingBar.bars[-1]
    # 300 rows, shards of 200: the bar moves every 4 batches of 16 rows, not once per shard.
    assert first.total == 300 and sum(first.updates) == 300 and len(first.updates) >= 5
    assert max(first.updates) == 64
    assert "Loading weights" not in capfd.readouterr().err  # transformers' own bar stays hidden
    (tmp_path / "out" / "part-00001.parquet").unlink()
    embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], shard_size=200, batch_size=16)
    resumed = _RecordingBar.bars[-1]
    # The finished shard lowers the total instead of counting as rows done now, so the rate is the real one.
    assert resumed.total == 100 and sum(resumed.updates) == 100 and "1 shards done before" in resumed.postfix


def test_batch_size_may_change_on_resume_and_settings_that_change_vectors_may_not(tiny_cls, tmp_path):
    source = write_texts(tmp_path / "in.txt")
    out = tmp_path / "out"
    embed_corpus(tiny_cls, source, out, devices=["cpu"], shard_size=100, batch_size=32, progress=False)
    whole = pq.read_table(out)
    (out / "part-00002.parquet").unlink()
    summary = embed_corpus(tiny_cls, source, out, devices=["cpu"], shard_size=100, batch_size=8, progress=False)
    assert (summary["shards_skipped"], summary["shards_done"]) == (2, 1)
    again = pq.read_table(out)
    assert again.column("id").to_pylist() == list(range(300))
    embeddings = [np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in (again, whole)]
    np.testing.assert_allclose(*embeddings, atol=1e-6)
    assert json.loads((out / "_manifest.json").read_text())["settings"]["batch_size"] == 8
    for change, named in [({"max_seq_length": 16}, "max_seq_length"), ({"truncate_dim": 16}, "truncate_dim"),
                          ({"output_dtype": "int8"}, "output_dtype"), ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(Exception, match=named):
            embed_corpus(tiny_cls, source, out, devices=["cpu"], shard_size=100, progress=False, **change)


def test_duplicate_ids_are_refused_naming_both_rows_or_kept_when_asked(tiny_cls, tmp_path):
    records = [{"doc": f"d{index % 4 if index == 5 else index}", "text": text} for index, text in enumerate(TEXTS[:8])]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(InputError, match=r"in.jsonl: line 6: id 'd1' is also the id of row 1 .*this is row 5"):
        embed_corpus(tiny_cls, source, tmp_path / "out", devices=["cpu"], id_field="doc", progress=False)
    embed_corpus(tiny_cls, source, tmp_path / "kept", devices=["cpu"], id_field="doc", on_duplicate_id="keep",
                 progress=False)
    assert pq.read_table(tmp_path / "kept").column("id").to_pylist() == [record["doc"] for record in records]
