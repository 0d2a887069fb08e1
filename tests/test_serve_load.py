"""``st-npu serve`` under load, on a model slow enough for batches to take visible time (4 layers x 256, CPU, one
torch thread): a large request beside a small one, clients that give up, and SIGTERM with a backlog. Latencies are
compared with each other in one run, never with fixed figures.
"""

from __future__ import annotations

import concurrent.futures
import signal
import statistics
import time
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai", "huggingface_hub", "cohere",
              "llama_index.embeddings.text_embeddings_inference"):
    pytest.importorskip(_name, reason=f'the server tests need {_name}: pip install "st-npu[serve-test]"')

import httpx  # noqa: E402

from st_npu.testing.fixtures import bert_folder  # noqa: E402
from test_serve import REQUEST_TIMEOUT_S, Server  # noqa: E402

MEDIUM = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
LONG = "word " * 600  # over the 512-token limit: auto-truncated to 512


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("medium") / "medium", MEDIUM, pooling="cls")


def serve(model: Path, *args: str) -> Server:
    return Server(model, "--device", "cpu", "--max-client-batch-size", "8", *args, env={"OMP_NUM_THREADS": "1"})


def timed(server: Server, body: dict) -> float:
    begun = time.perf_counter()
    server.http.post("/embed", json=body).raise_for_status()
    return time.perf_counter() - begun


def wait_for(condition, timeout: float = REQUEST_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_2mb_request_delays_a_one_word_request_by_at_most_one_batch(medium):
    server = serve(medium, "--max-batch-tokens", "1024", "--max-batch-size", "8")
    try:
        big = {"inputs": ["word " * 48_000] * 8}  # 1.9 MB, 8 texts cut to 512 tokens: 4 batches of 2 rows
        alone = statistics.median(timed(server, {"inputs": "hello"}) for _ in range(5))
        big_alone = timed(server, big)
        batch = big_alone / 4
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            big_future = pool.submit(timed, server, big)
            assert wait_for(lambda: server.metric("st_npu_requests_in_progress") >= 1)  # admitted and queued
            small = timed(server, {"inputs": "hello"})
            assert not big_future.done()  # the small one overtook it
            big_future.result(REQUEST_TIMEOUT_S)
        print(f"\none-word request alone {alone * 1000:.0f} ms, beside a 1.9 MB request {small * 1000:.0f} ms "
              f"({small / alone:.1f}x); one batch of the large request {batch * 1000:.0f} ms, "
              f"the large request {big_alone * 1000:.0f} ms")
        # at most the rest of the batch on the device when it arrived: the rest of the large request may fill
        # its batch, never lengthen it
        assert small < alone + 1.5 * batch
    finally:
        assert server.stop() == 0


HEAVY = {"inputs": [LONG] * 8}  # one batch of 8 x 512 tokens


def test_requests_whose_clients_gave_up_are_not_computed(medium):
    server = serve(medium, "--max-batch-tokens", "4096", "--max-batch-size", "8")
    try:
        started = time.perf_counter()
        server.http.post("/embed", json=HEAVY).raise_for_status()
        one = time.perf_counter() - started
        batches = server.metric("st_npu_batch_requests_count")

        def impatient(index: int) -> str:
            try:
                httpx.post(f"{server.url}/embed", json=HEAVY, timeout=one / 2)
            except httpx.TimeoutException:
                return "gave up"
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(impatient, range(8)))
        assert outcomes.count("gave up") >= 7
        assert wait_for(lambda: server.metric("st_npu_requests_in_progress") == 0)
        assert wait_for(lambda: server.metric("st_npu_requests_abandoned_total") >= 6)
        time.sleep(2 * one)  # a batch that was still to start would have run by now
        computed = server.metric("st_npu_batch_requests_count") - batches
        print(f"\n8 requests whose clients gave up after {one / 2:.2f} s: {computed:.0f} device batches ran")
        assert computed <= 2  # the batch on the device when they gave up, and at most one that had begun
    finally:
        assert server.stop() == 0


def test_sigterm_with_a_backlog_exits_within_the_graceful_timeout(medium):
    server = serve(medium, "--max-batch-tokens", "4096", "--max-batch-size", "8", "--graceful-timeout", "2")
    server.http.post("/embed", json=HEAVY).raise_for_status()

    def call(index: int) -> int | str:
        try:
            return httpx.post(f"{server.url}/embed", json=HEAVY, timeout=REQUEST_TIMEOUT_S).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, index) for index in range(16)]
        assert wait_for(lambda: server.metric("st_npu_requests_in_progress") >= 8)
        began = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(REQUEST_TIMEOUT_S)
        took = time.perf_counter() - began
        outcomes = [future.result(REQUEST_TIMEOUT_S) for future in futures]
    server.http.close()
    print(f"\nSIGTERM with {len(outcomes)} requests of 8 long texts in flight: exited {code} after {took:.1f} s "
          f"(--graceful-timeout 2); answers: {outcomes}")
    assert code == 0 and took < 2 + 5  # the graceful timeout, then at most the batch on the device
    assert 200 in outcomes and any(outcome != 200 for outcome in outcomes)
