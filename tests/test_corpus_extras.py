"""`st-npu embed-corpus` on an install without the corpus extra: one line before any work (runs in every
environment; where pyarrow is installed, the test hides it)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

TEXTS = [f"passage number {index}" for index in range(50)]


def test_without_pyarrow_the_command_refuses_before_any_work_in_one_line(tiny_cls, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(text + "\n" for text in TEXTS))
    code = ("import sys; sys.modules['pyarrow'] = None; from st_npu.cli import main; "
            f"sys.exit(main(['embed-corpus', {str(source)!r}, '--model', {str(tiny_cls)!r}, '--device', 'cpu', "
            f"'--output', {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'st-npu embed-corpus: error: st-npu embed-corpus reads and writes Parquet through pyarrow: '
        'pip install "st-npu[corpus]"']
    assert not (tmp_path / "out").exists()  # no model loaded, no shard embedded, nothing written
