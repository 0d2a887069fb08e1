"""Reading texts from files and standard input: row i is line i, and bad input names the file, line and problem."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from st_npu.files.inputs import InputError, iter_texts, read_texts


def test_blank_lines_are_empty_texts_so_rows_stay_aligned(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufefffirst\r\n\r\n   \nsecond 第二\n\nlast".encode("utf-8"))
    assert read_texts(path) == ["first", "", "   ", "second 第二", "", "last"]


def test_bad_utf8_names_file_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("good\n\nca\xf1on\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: line 3 .*at byte 8 of the file"):
        read_texts(path)


def test_input_errors_are_value_errors_for_callers_that_catch_those(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_texts(tmp_path / "missing.txt")


def test_jsonl_is_read_by_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "body": "alpha"}\n{"id": 2, "body": ""}\n', encoding="utf-8")
    assert read_texts(path, text_field="body") == ["alpha", ""]


@pytest.mark.parametrize(("content", "problem"), [
    ('{"text": "a"}\n{"body": "b"}\n', r"line 2 has no field 'text' \(fields: 'body'\); choose one with --text-field"),
    ('{"text": "a"}\n{"text": 3}\n', r"line 2: field 'text' is int \(3\), expected a string"),
    ('{"text": "a"}\n{"text": "b"\n', r"line 2 is malformed JSON \(column 13"),
    ('["a"]\n', r"line 1 holds a JSON list"),
    ('{"text": "a"}\n\n', r"line 2 is empty"),
])
def test_bad_jsonl_names_the_line_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=problem):
        read_texts(path)


def test_tabular_files_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(InputError, match="embed-corpus"):
        read_texts(path)


def test_the_stream_reads_lazily(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    stream = iter_texts(path)
    assert next(stream) == "ok"  # the bad second line is not read yet
    with pytest.raises(InputError):
        next(stream)


def test_dash_reads_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = io.TextIOWrapper(io.BytesIO("one\n\nthree\n".encode("utf-8")), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", fake)
    assert read_texts("-") == ["one", "", "three"]
