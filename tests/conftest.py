"""Shared fixtures. The suite runs offline on the CPU and on an emulated 8-device ``npu``.

The emulated npu proves device plumbing, shapes, transfers and compile counts, not Ascend kernels, their
numerics or speed. On a real Ascend machine set ``ST_NPU_TEST_DEVICE=npu`` (torch_npu and CANN loaded): the
emulator is then not installed, the hardware parity tests run, and emulator-only tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HARDWARE_DEVICE = os.environ.get("ST_NPU_TEST_DEVICE")
EMULATED_DEVICES = 8
REPO = Path(__file__).resolve().parent.parent

if not HARDWARE_DEVICE:
    from st_npu.emulator import backend as emulator

    emulator.install(devices=EMULATED_DEVICES)

from st_npu.testing.fixtures import TINY, bert_folder, llm_embedder_like, minilm_folder  # noqa: E402

needs_emulator = pytest.mark.skipif(bool(HARDWARE_DEVICE), reason="needs the emulated npu (ST_NPU_TEST_DEVICE is set)")


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_folder()


@pytest.fixture(scope="session")
def minilm_cls(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 weights with CLS pooling instead of mean (weights linked, not copied)."""
    folder = tmp_path_factory.mktemp("minilm_cls")
    for item in minilm_folder().iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    (folder / "model.safetensors").symlink_to(minilm_folder() / "model.safetensors")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    return folder


@pytest.fixture(scope="session")
def tiny_cls(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("tiny") / "tiny-cls", TINY, pooling="cls")


@pytest.fixture(scope="session")
def tiny_mean(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("tiny") / "tiny-mean", TINY, pooling="mean", normalize=False)


@pytest.fixture(scope="session")
def llm_like(tmp_path_factory) -> Path:
    """BAAI/llm-embedder's layout and shapes with random weights, in a folder named as the seed downloads it."""
    return llm_embedder_like(tmp_path_factory.mktemp("models") / "BAAI--llm-embedder")


def copy_folder(source: Path, target: Path) -> Path:
    """A copy of a model folder whose weights are linked, for tests that break one file."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in source.glob("*.safetensors"):
        (target / weights.name).symlink_to(weights)
    return target


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (for process-wide state: devices, LOCAL_RANK, import failures)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "st_npu", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})
