"""``st-npu serve`` started for real (a subprocess on a loopback port) and called with real clients: the ``openai``
package and plain HTTP. Needs the ``serve`` extra and ``openai``; skipped with the reason where they are missing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, needs_emulator

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_name, reason=f'the server tests need {_name}: pip install "st-npu[serve,serve-test]"')

import httpx  # noqa: E402
import openai  # noqa: E402

from st_npu import SentenceTransformer  # noqa: E402

API_KEY = "test-key"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 60
TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "短い文", "a b c " * 30, ""]
# Small limits, so that refusals and warm-up are cheap: 8 texts per batch, 1,024 padded tokens per batch.
SMALL = ["--max-batch-size", "8", "--max-batch-tokens", "1024", "--max-client-batch-size", "8"]


class Server:
    def __init__(self, model: Path, *args: str, emulate: int | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("ST_NPU_EMULATE", None)
        if emulate:
            env["ST_NPU_EMULATE"] = str(emulate)
        command = [sys.executable, "-m", "st_npu", "serve", "--model", str(model), "--port", str(self.port),
                   "--log-level", "warning", *args]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_statuses: list[int] = []
        self.http = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                self.health_statuses.append(self.http.get("/health").status_code)
                if self.health_statuses[-1] == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server was not ready within {START_TIMEOUT_S} s")

    def metric(self, name: str) -> float:
        """The sum of the samples of a metric, or of those whose name and labels start with ``name``."""
        lines = self.http.get("/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith(name) and ("{" in name or line[len(name)] in "{ "))

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop within {timeout} s of SIGTERM") from None
        finally:
            self.http.close()


@pytest.fixture(scope="module")
def cpu_server(tiny_cls: Path):
    server = Server(tiny_cls, "--spec", "BAAI/llm-embedder", "--device", "cpu", "--api-key", API_KEY, *SMALL,
                    "--max-concurrent-requests", "4")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def reference(tiny_cls: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_cls), device="cpu", spec="BAAI/llm-embedder")


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0)


def token_counts(model: SentenceTransformer, texts: list[str], prompt: str = "") -> list[int]:
    return [len(ids) for ids in model.tokenizer([prompt + text for text in texts])["input_ids"]]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_encode_vectors_and_token_usage(cpu_server, reference, encoding_format):
    response = openai_client(cpu_server).embeddings.create(input=TEXTS, model="llm-embedder",
                                                           encoding_format=encoding_format)
    if encoding_format == "base64":  # asked for explicitly, the client hands the string back; decode per OpenAI
        vectors = np.stack([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in response.data])
    else:
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(vectors, reference.encode(TEXTS), atol=1e-6, rtol=0)
    assert response.model == "llm-embedder"
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(token_counts(reference, TEXTS))


def test_openai_client_default_format_and_a_single_string(cpu_server, reference):
    response = openai_client(cpu_server).embeddings.create(input="Hello world", model="m")
    assert len(response.data) == 1
    np.testing.assert_allclose(response.data[0].embedding, reference.encode(["Hello world"])[0], atol=1e-6, rtol=0)


def test_tei_embed_with_llm_embedder_prompt_and_truncation(cpu_server, reference):
    body = {"inputs": TEXTS[:3], "prompt_name": "qa_query", "normalize": True}
    vectors = np.array(cpu_server.http.post("/embed", json=body).raise_for_status().json())
    np.testing.assert_allclose(vectors, reference.encode(TEXTS[:3], prompt_name="qa_query"), atol=1e-6, rtol=0)
    assert not np.allclose(vectors, reference.encode(TEXTS[:3]), atol=1e-3)  # the instruction was really added

    long_text = "word " * 700
    response = cpu_server.http.post("/embed", json={"inputs": long_text, "truncate": True})
    np.testing.assert_allclose(response.raise_for_status().json(), reference.encode([long_text]), atol=1e-6, rtol=0)


def test_openai_prompt_name_as_extra_field(cpu_server, reference):
    response = openai_client(cpu_server).embeddings.create(input=["how to reset a password"], model="m",
                                                           extra_body={"prompt_name": "qa_query"})
    expected = reference.encode(["how to reset a password"], prompt_name="qa_query")
    np.testing.assert_allclose([response.data[0].embedding], expected, atol=1e-6, rtol=0)
    prompt = reference.prompts["qa_query"]
    assert response.usage.prompt_tokens == token_counts(reference, ["how to reset a password"], prompt)[0]


BAD_REQUESTS = [
    ("/embed", {"inputs": ["x"] * 9}, 413, "9 texts, more than --max-client-batch-size 8"),
    ("/v1/embeddings", {"input": ["x"] * 9}, 413, "9 texts"),
    ("/embed", {"inputs": ["ok", "word " * 600], "truncate": False}, 413, "inputs[1] has 602 tokens"),
    ("/v1/embeddings", {"input": ["ok", "ok", "word " * 600]}, 413, "input[2] has 602 tokens"),
    ("/embed", {"inputs": []}, 422, "inputs is an empty list"),
    ("/v1/embeddings", {"input": []}, 422, "input is an empty list"),
    ("/embed", {"inputs": ["ok", 7]}, 422, "inputs[1] is int"),
    ("/v1/embeddings", {"input": ["ok", "ok", None]}, 422, "input[2] is NoneType"),
    ("/embed", b'{"inputs": ["unclosed"', 400, "malformed JSON"),
    ("/v1/embeddings", b"not json", 400, "malformed JSON"),
    ("/embed", {"inputs": "x", "prompt_name": "no_such_task"}, 422, "unknown prompt_name 'no_such_task'"),
    ("/v1/embeddings", {"input": "x", "prompt_name": "no_such_task"}, 422, "unknown prompt_name"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, 400, "dimensions=8 cannot be given"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "normalize must be true or false"),
]


@pytest.mark.parametrize(("route", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_clear_json_errors(cpu_server, route, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = cpu_server.http.post(route, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if route.startswith("/v1/"):  # OpenAI's shape, which its client turns into an exception with the message
        assert message in error["message"] and error["type"] == "invalid_request_error"
    else:  # TEI's
        assert message in error and response.json()["error_type"] == "Validation"


def test_openai_client_raises_with_the_message(cpu_server):
    with pytest.raises(openai.BadRequestError, match="dimensions=8 cannot be given"):
        openai_client(cpu_server).embeddings.create(input="x", model="m", dimensions=8)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required(cpu_server, headers):
    with httpx.Client(base_url=cpu_server.url, timeout=REQUEST_TIMEOUT_S, headers=headers) as client:
        for route in ("/embed", "/v1/embeddings"):
            response = client.post(route, json={"inputs": "x", "input": "x"})
            assert response.status_code == 401 and "API key" in response.text
        assert client.get("/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cpu_server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            input="x", model="m")


def test_health_info_and_metrics(cpu_server):
    info = cpu_server.http.get("/info").json()
    assert info["devices"] == ["cpu"] and info["max_input_length"] == 512 and info["embedding_dimension"] == 32
    assert info["max_batch_tokens"] == 1024 and info["max_client_batch_size"] == 8 and "qa_query" in info["prompts"]
    before = cpu_server.metric("st_npu_tokens_total")
    cpu_server.http.post("/embed", json={"inputs": ["one two three"]}).raise_for_status()
    assert cpu_server.metric("st_npu_tokens_total") == before + 5  # [CLS] one two three [SEP]
    assert cpu_server.metric("st_npu_batch_size_count") >= 1
    assert cpu_server.metric("st_npu_compute_seconds_count") >= 1


def test_flood_gets_429_and_every_other_request_its_vectors(cpu_server, reference):
    texts = ["flood " * 100] * 8  # 8 texts of 102 tokens: one request is one full batch

    def call(index: int) -> httpx.Response:
        return cpu_server.http.post("/embed", json={"inputs": texts})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(call, range(64)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 429}, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert "--max-concurrent-requests 4" in refused.json()["error"] and refused.json()["error_type"] == "Overloaded"
    expected = reference.encode(texts)
    for response in responses:
        if response.status_code == 200:
            np.testing.assert_allclose(response.json(), expected, atol=1e-6, rtol=0)


@needs_emulator
def test_two_emulated_npus_batch_concurrent_clients_without_new_compilations(tiny_cls):
    reference = SentenceTransformer(str(tiny_cls), device="npu:0")
    server = Server(tiny_cls, "--devices", "npu:0,npu:1", *SMALL, "--api-key", API_KEY, emulate=2)
    try:
        assert 503 in server.health_statuses  # not ready while the static shapes compiled
        assert server.http.get("/info").json()["devices"] == ["npu:0", "npu:1"]
        compiles = server.metric("st_npu_emulated_npu_compiles_total")
        launches = server.metric("st_npu_emulated_npu_launches_total")
        replays = server.metric("st_npu_emulated_npu_graph_replays_total")
        requests = [[f"question {index}", "a longer document " * (index % 5 + 1)] for index in range(24)]
        client = openai_client(server)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda texts: client.embeddings.create(input=texts, model="m"), requests))
        for texts, response in zip(requests, responses):
            vectors = np.array([item.embedding for item in response.data])
            np.testing.assert_allclose(vectors, reference.encode(texts), atol=1e-6, rtol=0)
        assert server.metric("st_npu_emulated_npu_compiles_total") == compiles  # warm-up compiled every shape
        # warm-up captured every shape under the token budget: each batch is a copy in, a replay, a copy out
        replayed = server.metric("st_npu_emulated_npu_graph_replays_total") - replays
        assert replayed >= 1 and server.metric("st_npu_emulated_npu_launches_total") - launches == 3 * replayed
        batches = server.metric("st_npu_batch_requests_count")
        assert batches < len(requests)  # requests were gathered into shared batches
        for device in ("npu:0", "npu:1"):
            assert server.metric(f'st_npu_batch_requests_count{{device="{device}"') >= 1
    finally:
        assert server.stop() == 0


@needs_emulator
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_requests_in_flight_and_exits_0(tiny_cls, stop_signal):
    server = Server(tiny_cls, "--device", "npu:0", *SMALL, "--api-key", API_KEY, emulate=1)
    texts = ["an in-flight request " * 20] * 8

    def call(index: int) -> httpx.Response:
        return server.http.post("/embed", json={"inputs": texts})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, index) for index in range(16)]
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while (in_flight := server.metric("st_npu_requests_in_progress")) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(stop_signal)
        assert in_flight >= 4 and not all(future.done() for future in futures)
        responses = [future.result(timeout=REQUEST_TIMEOUT_S) for future in futures]
    assert server.process.wait(REQUEST_TIMEOUT_S) == 0
    assert [response.status_code for response in responses] == [200] * 16
    assert all(len(response.json()) == 8 for response in responses)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_bench_serve_compares_both_servers_within_its_bounds(tiny_cls, tmp_path):
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "st_npu", "bench-serve", "--model", str(tiny_cls), "--device", "cpu",
         "--clients", "1,4", "--duration", "0.5", "--max-requests", "40", "--json", str(report)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    results = json.loads(report.read_text())["results"]
    assert [(r["clients"], r["server"]) for r in results] == [
        (1, "one-at-a-time"), (1, "batching"), (4, "one-at-a-time"), (4, "batching")]
    assert all(0 < r["requests"] <= 40 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in results)
    assert "| 4 |" in result.stdout and "speed" in result.stdout
