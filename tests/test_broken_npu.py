"""torch_npu installed without CANN: the real failure modes of PyPI's torch-npu, explained, never a traceback.

CI installs torch-npu (matching torch) into its own folder and names it in ST_NPU_BROKEN_TORCH_NPU; these tests
put that folder on PYTHONPATH of a subprocess, where `import torch` then fails by torch_npu's autoload.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_cli, run_python

BROKEN_SITE = os.environ.get("ST_NPU_BROKEN_TORCH_NPU")
pytestmark = pytest.mark.skipif(not BROKEN_SITE, reason="set ST_NPU_BROKEN_TORCH_NPU to a folder holding torch-npu "
                                                        "(pip install --target DIR --no-deps torch-npu); .ci/run does")
CANN_FIX = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


def broken(autoload: bool = True) -> dict[str, str]:
    env = {"PYTHONPATH": BROKEN_SITE, "ST_NPU_EMULATE": ""}
    if not autoload:
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    return env


def test_info_explains_the_autoload_failure():
    result = run_cli("info", env=broken())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "torch-npu" in result.stdout and "2.13.0" in result.stdout
    assert "Failed to load the backend extension: torch_npu" in result.stdout
    assert "libhccl.so" in result.stdout and CANN_FIX in result.stdout


def test_info_with_autoload_off_names_the_missing_library():
    result = run_cli("info", "--json", env=broken(autoload=False))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "libhccl.so" in result.stdout and CANN_FIX in result.stdout


@pytest.mark.parametrize("autoload", [True, False])
def test_embed_on_npu_says_what_is_wrong(tiny_cls, autoload):
    result = run_cli("embed", "--model", str(tiny_cls), "--text", "hi", "--device", "npu", env=broken(autoload))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "CANN libraries are not loaded" in result.stderr and CANN_FIX in result.stderr


def test_library_raises_the_fix_on_first_use(tiny_cls):
    result = run_python(
        "import st_npu\n"
        "try:\n"
        f"    st_npu.SentenceTransformer({str(tiny_cls)!r}, device='npu:0')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n",
        env=broken(autoload=False),
    )
    assert "CANN libraries are not loaded" in result.stdout and CANN_FIX in result.stdout, result.stderr


def test_the_advice_for_the_cpu_is_one_that_works(tiny_cls):
    """Autoload off lets `import torch` pass, but transformers still imports the broken torch_npu: only an
    environment without torch-npu runs on the CPU, and that is what info advises."""
    autoload_off = run_cli("embed", "--model", str(tiny_cls), "--text", "hi", "--device", "cpu",
                           env=broken(autoload=False))
    assert autoload_off.returncode == 2 and "CANN libraries are not loaded" in autoload_off.stderr
    fix = run_cli("info", env=broken()).stdout
    assert "pip uninstall torch-npu" in fix and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" not in fix.split("fix:")[-1]
    without_torch_npu = run_cli("embed", "--model", str(tiny_cls), "--text", "hi", "--device", "cpu",
                                env={"ST_NPU_EMULATE": ""})
    assert without_torch_npu.returncode == 0, without_torch_npu.stderr
