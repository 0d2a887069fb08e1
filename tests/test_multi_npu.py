"""Several NPUs from one process: stock multi-process pools under ``st_npu.patch()`` and through ``start_pool``.

Pools spawn workers that re-import torch (several seconds each on this 2-core machine), so each test starts at
most one pool of two workers and uses the tiny model. On the emulator the workers run on the CPU: these tests
prove placement, result order and failure handling, not speed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import sentence_transformers
import torch
import transformers
from conftest import needs_emulator, run_python

import st_npu
from st_npu import patching
from st_npu.runtime import pools
from st_npu.runtime.devices import DeviceError

StockST = sentence_transformers.SentenceTransformer
TEXTS = [f"text {i}: " + "word " * (i % 13) for i in range(48)]
TWO_NPUS = ["npu:0", "npu:1"]


@pytest.fixture(autouse=True)
def emulator_only_in_process(monkeypatch):
    """The parent has the emulator installed in-process but no ST_NPU_EMULATE: workers must get it anyway."""
    monkeypatch.delenv("ST_NPU_EMULATE", raising=False)
    yield
    patching.unpatch()


def test_default_devices_are_every_npu():
    assert transformers.is_torch_npu_available()  # stock's own default would also pick npu:0..N-1
    count = torch.npu.device_count()
    assert pools.pool_devices(None) == [f"npu:{index}" for index in range(count)]
    assert pools.pool_devices(["npu:1", "cpu", torch.device("npu", 2)]) == ["npu:1", "cpu", "npu:2"]
    with pytest.raises(DeviceError, match="does not exist"):
        pools.pool_devices([f"npu:{count}"])  # refused before any worker is spawned


def test_st_npu_model_pool_hook(tiny_cls, monkeypatch):
    """st_npu.SentenceTransformer's own start_multi_process_pool must go through start_pool (model.py hook)."""
    asked: list[object] = []

    def fake_start(self, target_devices=None):
        asked.append(target_devices)
        return {"input": None, "output": "queue", "processes": []}

    monkeypatch.setattr(StockST, "start_multi_process_pool", fake_start)
    pool = st_npu.SentenceTransformer(str(tiny_cls), device="cpu").start_multi_process_pool()
    assert asked == [[f"npu:{index}" for index in range(torch.npu.device_count())]]
    assert isinstance(pool["output"], pools.WatchedResults)


def test_encode_on_two_npus_matches_one(tiny_cls):
    with patching.patch():
        model = StockST(str(tiny_cls))
        one = model.encode(TEXTS, batch_size=8)
        two = model.encode(TEXTS, batch_size=8, device=TWO_NPUS, chunk_size=4)  # 12 chunks over two workers
    assert two.shape == one.shape
    np.testing.assert_allclose(two, one, atol=1e-6)  # row i is text i: chunks come back in input order


@pytest.mark.parametrize("kind", ["stock under patch", "st_npu"])
def test_dead_worker_raises_and_stops_the_pool(tiny_cls, kind):
    if kind == "st_npu":
        model = st_npu.SentenceTransformer(str(tiny_cls))
        pool = pools.start_pool(TWO_NPUS, model.start_multi_process_pool)
    else:
        patching.patch()
        model = StockST(str(tiny_cls))
        pool = model.start_multi_process_pool(TWO_NPUS)
    try:
        model.encode(TEXTS[:8], pool=pool, chunk_size=1)  # both workers are up (or at least one is)
        victim = pool["processes"][1]
        threading.Timer(1.5, os.kill, (victim.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(pools.WorkerDiedError, match=rf"pid {victim.pid} on npu:1 was killed by SIGKILL"):
            model.encode(TEXTS * 40, pool=pool, chunk_size=8)  # 240 chunks: far longer than 1.5 s
        assert time.monotonic() - started < 15
        assert not any(process.is_alive() for process in pool["processes"])
    finally:
        model.stop_multi_process_pool(pool)  # still works on the stopped workers


@needs_emulator
def test_default_pool_in_a_fresh_process(tiny_cls):
    """``start_multi_process_pool()`` with no devices, ST_NPU_EMULATE=2, a stock model under the patch."""
    result = run_python(
        "import numpy as np, sentence_transformers, st_npu.patching\n"
        "if __name__ == '__main__':\n"
        "    st_npu.patching.patch()\n"
        f"    model = sentence_transformers.SentenceTransformer({str(tiny_cls)!r})\n"
        f"    texts = {TEXTS[:16]!r}\n"
        "    one = model.encode(texts)\n"
        "    pool = model.start_multi_process_pool()\n"
        "    print('workers', len(pool['processes']))\n"
        "    two = model.encode(texts, pool=pool, chunk_size=2)\n"
        "    model.stop_multi_process_pool(pool)\n"
        "    print('same', np.allclose(one, two, atol=1e-6))\n",
        env={"ST_NPU_EMULATE": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert "workers 2" in result.stdout and "same True" in result.stdout
