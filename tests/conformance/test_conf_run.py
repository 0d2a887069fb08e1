"""``st-npu run`` on an unchanged script that loads a StaticEmbedding model gives stock's output (issue 17, cause 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
import numpy as np
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1])  # no device: under st-npu run the patch picks the npu
np.save(sys.argv[2], model.encode(["Hello world", "A man is eating food.", "今天天气很好", "x"], convert_to_numpy=True))
print("device", model.device)
"""


@pytest.mark.skipif(bool(os.environ.get("ST_NPU_TEST_DEVICE")), reason="needs the emulated npu")
def test_st_npu_run_static_embedding_script_gives_stock_output(models, tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "ST_NPU_EMULATE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    stock = subprocess.run([sys.executable, str(script), str(models["static"]), str(tmp_path / "stock.npy")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert stock.returncode == 0, stock.stderr
    ours = subprocess.run([sys.executable, "-m", "st_npu", "run", str(script), str(models["static"]),
                           str(tmp_path / "ours.npy")], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env, "ST_NPU_EMULATE": "2"})
    assert ours.returncode == 0, ours.stderr
    assert "device npu:0" in ours.stdout and "device cpu" in stock.stdout
    expected, got = np.load(tmp_path / "stock.npy"), np.load(tmp_path / "ours.npy")
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-6
