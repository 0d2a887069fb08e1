"""The Ray engine's reading: shards cut from the files' row counts and read where they are embedded are the shards
the local engine streams (text files entered at a checkpoint, Parquet files at a row group)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

pyarrow = pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
import pyarrow.parquet as pq  # noqa: E402

from st_npu.corpus import reader  # noqa: E402
from st_npu.corpus.reader import Fields, count_file, plan_shards, read_shard, shards  # noqa: E402
from st_npu.corpus.storage import locate  # noqa: E402


@pytest.mark.parametrize("shard_size", [1, 4, 10, 33, 1000])
def test_planned_shards_read_in_place_equal_the_streamed_shards(tmp_path, monkeypatch, shard_size):
    monkeypatch.setattr(reader, "CHECKPOINT_ROWS", 5)
    texts = [f"text {index}" if index % 6 else "" for index in range(23)]
    (tmp_path / "a.txt").write_text("\n".join(texts))  # no newline after the last line
    table = pyarrow.table({"text": [f"row {index}" for index in range(50)], "n": list(range(50))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=7)
    lines = [json.dumps({"text": f"json {index}"}) for index in range(8)] + ["{broken"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.csv").write_text("text,n\n" + "".join(f'"csv, {index}",{index}\n' for index in range(12)))
    files = [locate(path) for path in sorted(tmp_path.iterdir())]
    fields = Fields("text")
    counts = [count_file(path, fields) for path in files]
    assert [count.rows for count in counts] == [23, 50, 9, 12]
    assert counts[0].checkpoints[1] == sum(len(text) + 1 for text in texts[:5])
    streamed = list(shards(files, fields, shard_size, skip_empty=True, skip_bad_rows=True))
    planned = [read_shard(plan, fields, skip_empty=True, skip_bad_rows=True)
               for plan in plan_shards(counts, shard_size)]
    assert [asdict(shard) for shard in planned] == [asdict(shard) for shard in streamed]
    assert sum(len(shard.rejects) for shard in planned) == 1 and sum(s.empty_skipped for s in planned) == 4
