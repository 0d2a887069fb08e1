"""Device and dtype choice: auto-detection, LOCAL_RANK, explicit indices and the errors that carry the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import EMULATED_DEVICES, needs_emulator, run_python

import st_npu
from st_npu.runtime.devices import DeviceError, check_dtype_supported, resolve_device, resolve_dtype
from st_npu.emulator import backend as emulator


@needs_emulator
@pytest.mark.parametrize(
    ("asked", "expected"),
    [(None, "npu:0"), ("auto", "npu:0"), ("npu", "npu:0"), ("npu:3", "npu:3"), ("NPU:7", "npu:7"),
     (torch.device("npu", 5), "npu:5"), ("cpu", "cpu")],
)
def test_resolve_device(asked, expected):
    assert resolve_device(asked) == torch.device(expected)


@needs_emulator
def test_local_rank_picks_this_process_npu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert resolve_device(None) == torch.device("npu:6")
    assert resolve_device("npu") == torch.device("npu:6")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(DeviceError, match="LOCAL_RANK='x'"):
        resolve_device(None)


@needs_emulator
def test_index_out_of_range_says_how_many_npus_exist():
    with pytest.raises(DeviceError, match=rf"npu:{EMULATED_DEVICES} does not exist: .* {EMULATED_DEVICES} npu"):
        resolve_device(f"npu:{EMULATED_DEVICES}")


@pytest.mark.parametrize(("asked", "message"), [("tpu", "Unknown device 'tpu'"), ("npu:x", "invalid index 'x'"),
                                                (3, "must be a string or torch.device"),
                                                ("cuda:0", "no cuda device is available")])
def test_bad_devices_are_named(asked, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(asked)


@pytest.mark.parametrize(("asked", "expected"), [(None, None), ("fp16", torch.float16), ("BFloat16", torch.bfloat16),
                                                 ("torch.float32", torch.float32), (torch.float16, torch.float16)])
def test_resolve_dtype(asked, expected):
    assert resolve_dtype(asked) == expected


@pytest.mark.parametrize("asked", ["int8", torch.float64, 16])
def test_bad_dtype_is_named(asked):
    with pytest.raises(ValueError, match="Unsupported dtype"):
        resolve_dtype(asked)


@needs_emulator
def test_bf16_on_a_chip_without_it_is_refused():
    try:
        emulator.install(devices=EMULATED_DEVICES, chip="Ascend910A")
        with pytest.raises(DeviceError, match="Ascend910A.*no bfloat16.*float16"):
            check_dtype_supported(torch.device("npu:1"), torch.bfloat16)
        check_dtype_supported(torch.device("npu:1"), torch.float16)
    finally:
        emulator.install(devices=EMULATED_DEVICES)
    check_dtype_supported(torch.device("npu:1"), torch.bfloat16)


@needs_emulator
def test_model_on_npu_encodes_like_cpu(tiny_cls):
    texts = ["hello there", "你好，世界", "a " * 300]
    model = st_npu.SentenceTransformer(tiny_cls, device="npu:3")
    assert model.device == torch.device("npu:3")
    on_cpu = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(texts)
    assert abs(model.encode(texts) - on_cpu).max() <= 1e-6
    tensor = model.encode(texts, convert_to_tensor=True)
    assert tensor.device == torch.device("npu:3")


def test_without_torch_npu_an_npu_request_says_how_to_install(tiny_cls):
    result = run_python(
        "import st_npu\n"
        "try:\n"
        f"    st_npu.SentenceTransformer({str(tiny_cls)!r}, device='npu')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        f"print(st_npu.SentenceTransformer({str(tiny_cls)!r}).device)\n",
        env={"ST_NPU_EMULATE": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "DeviceError" in result.stdout and 'pip install "st-npu[npu]"' in result.stdout
    assert result.stdout.strip().endswith("cpu")  # auto falls back to the CPU where no NPU exists


@needs_emulator
def test_auto_device_follows_local_rank_in_a_subprocess(tiny_cls):
    result = run_python(f"import st_npu; print(st_npu.SentenceTransformer({str(tiny_cls)!r}).device)",
                        env={"ST_NPU_EMULATE": "4", "LOCAL_RANK": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "npu:2"
