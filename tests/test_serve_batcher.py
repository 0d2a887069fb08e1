"""The server's batcher on its own (no HTTP stack needed): gathering, order, budgets, isolation of failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import st_npu.serve
from st_npu.cli import main
from st_npu.errors import UsageError
from st_npu.serve.batcher import Batcher, DeadlineExceeded, Job, QueueFull

TIMEOUT_S = 30


class FakeModel:
    """Encodes a text as [its length, its position in the call]; a text "boom" makes the whole call fail."""

    max_seq_length = 512
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None, bool, int]] = []
        self.entered = threading.Event()  # set by the first encode after warm-up, which then waits for `release`
        self.release = threading.Event()
        self.release.set()

    def encode(self, texts, prompt_name=None, batch_size=32, **kwargs):
        if texts == ["warm-up"]:
            return np.zeros((1, 2))
        self.entered.set()
        self.release.wait(TIMEOUT_S)
        self.calls.append((list(texts), prompt_name, batch_size))
        if "boom" in texts:
            raise ValueError("boom")
        return np.array([[len(text), position] for position, text in enumerate(texts)], dtype=np.float32)


def job(texts: list[str], prompt_name: str | None = None, longest: int = 10) -> Job:
    """A request whose texts each have ``longest`` tokens."""
    return Job(texts, [[0] * longest for _ in texts], (prompt_name, "sentence"))


def run(batcher: Batcher, jobs: list[Job]) -> list:
    """Queue every job before the workers start, so they all wait together."""
    futures = [batcher.submit(each) for each in jobs]
    batcher.start()
    try:
        return [future.exception(TIMEOUT_S) or np.array(future.result()) for future in futures]
    finally:
        batcher.close()


def test_waiting_requests_share_one_encode_and_get_their_own_rows_in_order():
    model = FakeModel()
    results = run(Batcher([model], 16384, 64, 100), [job(["a", "bb"]), job(["ccc"]), job(["dddd", "e"])])
    assert [texts for texts, *_ in model.calls] == [["a", "bb", "ccc", "dddd", "e"]]
    assert [r[:, 0].tolist() for r in results] == [[1, 2], [3], [4, 1]]


def test_different_prompts_go_to_different_batches():
    model = FakeModel()
    run(Batcher([model], 16384, 64, 100), [job(["q1"], "qa_query"), job(["d1"]), job(["q2"], "qa_query")])
    assert [(texts, prompt) for texts, prompt, *_ in model.calls] == [(["q1", "q2"], "qa_query"), (["d1"], None)]


def test_token_budget_bounds_the_padded_batch():
    model = FakeModel()  # a text of 300 tokens pads to the 512 bucket
    run(Batcher([model], 1024, 64, 100), [job(["a"], longest=300), job(["b"], longest=300), job(["c"], longest=10)])
    # 2 rows x 512 = 1024 fits; a third row pads to 4 x 512 > 1024, so "c" waits for the next batch
    assert [texts for texts, *_ in model.calls] == [["a", "b"], ["c"]]
    assert model.calls[0][2] == 2  # one forward for the whole batch


def test_a_large_request_is_cut_and_a_later_small_one_waits_one_batch():
    model = FakeModel()  # 6 rows of 300 tokens: 2 per batch under a 1024 budget
    big, small = job([f"big{i}" for i in range(6)], longest=300), job(["small"], longest=3)
    results = run(Batcher([model], 1024, 64, 100), [big, small])
    calls = [texts for texts, *_ in model.calls]
    assert calls[0] == ["big0", "big1"] and "small" in calls[1]  # the small one runs in the second batch
    assert [text for texts in calls for text in texts if text.startswith("big")] == [f"big{i}" for i in range(6)]
    assert results[0][:, 0].tolist() == [4] * 6 and results[1][:, 0].tolist() == [5]


def test_a_small_request_arriving_during_a_large_one_runs_in_the_next_batch():
    model = FakeModel()
    model.release.clear()
    batcher = Batcher([model], 1024, 64, 100)
    big = batcher.submit(job([f"big{i}" for i in range(6)], longest=300))
    batcher.start()
    try:
        assert model.entered.wait(TIMEOUT_S)  # the first two rows of the large request are on the device
        small = batcher.submit(job(["small"], longest=3))
        model.release.set()
        assert small.result(TIMEOUT_S)[0][0] == 5 and len(big.result(TIMEOUT_S)) == 6
    finally:
        model.release.set()
        batcher.close()
    assert [texts for texts, *_ in model.calls][:2] == [["big0", "big1"], ["small"]]


def test_an_abandoned_request_never_reaches_the_model():
    model = FakeModel()
    model.release.clear()
    batcher = Batcher([model], 16384, 1, 100)
    first, second, third = job(["first"]), job(["second"]), job(["third"])
    futures = [batcher.submit(each) for each in (first, second, third)]
    batcher.start()
    try:
        assert model.entered.wait(TIMEOUT_S)  # "first" is on the device
        batcher.abandon(second)
        batcher.abandon(first)  # too late to stop, its answer is dropped
        model.release.set()
        assert futures[2].result(TIMEOUT_S)[0][0] == 5
        assert futures[1].cancelled()
        with pytest.raises(BaseException):
            futures[0].result(TIMEOUT_S)
    finally:
        model.release.set()
        batcher.close()
    assert [texts for texts, *_ in model.calls] == [["first"], ["third"]]


def test_close_cancels_what_never_reached_a_device():
    model = FakeModel()
    model.release.clear()
    batcher = Batcher([model], 16384, 1, 100)
    futures = [batcher.submit(job([f"t{i}"])) for i in range(3)]
    batcher.start()
    assert model.entered.wait(TIMEOUT_S)
    closing = threading.Thread(target=batcher.close, args=(TIMEOUT_S,))
    closing.start()
    with pytest.raises(QueueFull, match="stopped before"):
        futures[2].result(TIMEOUT_S)
    model.release.set()
    closing.join(TIMEOUT_S)
    assert futures[0].result(TIMEOUT_S)[0][0] == 2 and len(model.calls) == 1


def test_one_failing_request_fails_alone():
    model = FakeModel()
    results = run(Batcher([model], 16384, 64, 100), [job(["ok"]), job(["boom"]), job(["fine", "x"])])
    assert results[0][:, 0].tolist() == [2] and results[2][:, 0].tolist() == [4, 1]
    assert isinstance(results[1], ValueError)


def test_one_at_a_time_runs_each_request_alone():
    model = FakeModel()
    run(Batcher([model], 16384, 64, 100, max_batch_requests=1), [job(["a"]), job(["b"]), job(["c"])])
    assert [texts for texts, *_ in model.calls] == [["a"], ["b"], ["c"]]


def test_queue_full_and_budget_below_the_model_length_are_refused():
    batcher = Batcher([FakeModel()], 16384, 64, 2)
    batcher.submit(job(["a"]))
    batcher.submit(job(["b"]))
    with pytest.raises(QueueFull, match="--max-concurrent-requests 2"):
        batcher.submit(job(["c"]))
    with pytest.raises(ValueError, match="at least the model's maximum input length"):
        Batcher([FakeModel()], 256, 64, 2)


def test_two_devices_work_side_by_side():
    models = [FakeModel(), FakeModel()]
    for model in models:
        model.release.clear()
    batcher = Batcher(models, 16384, 1, 100)
    futures = [batcher.submit(job([f"t{i}"])) for i in range(4)]
    batcher.start()
    try:
        # one row per batch: while the first device holds its batch, the other must take the next
        assert all(model.entered.wait(TIMEOUT_S) for model in models)
        for model in models:
            model.release.set()
        assert [future.result(TIMEOUT_S)[0][0] for future in futures] == [2, 2, 2, 2]
    finally:
        for model in models:
            model.release.set()
        batcher.close()


def test_without_the_serve_extra_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(st_npu.serve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r'pip install "st-npu\[serve\]"'):
        st_npu.serve.require_serve_stack()
    assert main(["serve", "--model", "unused"]) == 2
    assert 'pip install "st-npu[serve]"' in capsys.readouterr().err


@pytest.mark.parametrize("devices", ["npu:0,npu:0", "npu:0,,npu:1"])
def test_devices_must_be_distinct_and_named(devices, capsys):
    pytest.importorskip("fastapi", reason='the server checks its extra first: pip install "st-npu[serve]"')
    assert main(["serve", "--model", "unused", "--devices", devices]) == 2
    assert "--devices takes distinct devices" in capsys.readouterr().err


def test_torch_threads_are_shared_by_the_cpu_workers_within_the_owned_cores(monkeypatch):
    import torch

    from st_npu.commands import serve

    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(serve.Path, "read_text", lambda self: "400000 100000")  # a cgroup quota of 4 cores
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert serve.owned_cores() == 4
        assert serve.size_threads(cpu_workers=2, tokenization_workers=None) == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
        torch.set_num_threads(3)
        assert serve.size_threads(cpu_workers=1, tokenization_workers=3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_request_past_its_deadline_never_reaches_the_model_and_one_on_the_device_finishes():
    model = FakeModel()
    model.release.clear()
    batcher = Batcher([model], 16384, 1, 100)
    first, late, gone, kept = job(["first"]), job(["late"]), job(["gone"]), job(["kept"])
    first.deadline = late.deadline = time.perf_counter() + TIMEOUT_S
    futures = [batcher.submit(each) for each in (first, late, gone, kept)]
    batcher.start()
    try:
        assert model.entered.wait(TIMEOUT_S)  # "first" is on the device
        assert not batcher.expire(first)  # too late to drop: it finishes
        assert batcher.expire(gone)  # dropped by the route, at its deadline
        late.deadline = time.perf_counter() - 1  # passed while it waited: the worker drops it
        model.release.set()
        assert futures[0].result(TIMEOUT_S)[0][0] == 5 and futures[3].result(TIMEOUT_S)[0][0] == 4
        for future in futures[1:3]:
            with pytest.raises(DeadlineExceeded):
                future.result(TIMEOUT_S)
    finally:
        model.release.set()
        batcher.close()
    assert [texts for texts, *_ in model.calls] == [["first"], ["kept"]]


def test_a_failed_warm_up_refuses_requests_and_says_why():
    class Broken(FakeModel):
        def encode(self, texts, **kwargs):
            if texts == ["warm-up"]:
                raise RuntimeError("no kernel for this shape")
            return super().encode(texts, **kwargs)

    batcher = Batcher([Broken()], 16384, 64, 100)
    waiting = batcher.submit(job(["queued before the warm-up failed"]))
    batcher.start()
    with pytest.raises(QueueFull, match="warm-up: RuntimeError: no kernel"):
        waiting.result(TIMEOUT_S)
    assert not batcher.ready and "no kernel" in str(batcher.failure)
    with pytest.raises(QueueFull, match="failed its warm-up"):
        batcher.submit(job(["after"]))
    batcher.close()
