"""``st-npu serve`` started for real (a subprocess on a loopback port) and called with real clients: the ``openai``
SDK, huggingface_hub's ``InferenceClient``, LlamaIndex's TEI embedding class, the ``cohere`` SDK, and plain HTTP.
Each answer is checked against the same model run in this process. Needs the ``serve-test`` extra; skipped with
the reason where a package is missing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, needs_emulator

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai", "huggingface_hub", "cohere",
              "llama_index.embeddings.text_embeddings_inference"):
    pytest.importorskip(_name, reason=f'the server tests need {_name}: pip install "st-npu[serve-test]"')

import cohere  # noqa: E402
import httpx  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import huggingface_hub.errors  # noqa: E402
import openai  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference  # noqa: E402
from sentence_transformers import CrossEncoder  # noqa: E402

from st_npu import SentenceTransformer  # noqa: E402
from st_npu.testing.fixtures import TINY, TOKENIZER_FILES, minilm_folder, write_json  # noqa: E402

API_KEY = "test-key"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 60
TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "短い文", "a b c " * 30, ""]
# Small limits, so that refusals and warm-up are cheap: 8 texts per batch, 1,024 padded tokens per batch.
SMALL = ["--max-batch-size", "8", "--max-batch-tokens", "1024", "--max-client-batch-size", "8"]


def cross_encoder_folder(folder: Path, seed: int = 1) -> Path:
    """A tiny BERT cross-encoder (one label) with random weights, wide enough that its scores differ."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=1, initializer_range=0.5, **TINY)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                  "model_max_length": 512})
    return folder


@pytest.fixture(scope="session")
def tiny_ce(tmp_path_factory) -> Path:
    return cross_encoder_folder(tmp_path_factory.mktemp("tiny") / "tiny-ce")


class Server:
    def __init__(self, model: Path | None, *args: str, emulate: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
        env.pop("ST_NPU_EMULATE", None)
        if emulate:
            env["ST_NPU_EMULATE"] = str(emulate)
        command = [sys.executable, "-m", "st_npu", "serve", *(["--model", str(model)] if model else []),
                   "--port", str(self.port), "--log-level", "warning", *args]
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a server writing to a full pipe nobody reads would stall
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_statuses: list[int] = []
        self.http = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log.read()}")
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
            self.log.close()


@pytest.fixture(scope="module")
def cpu_server(tiny_cls: Path, tiny_ce: Path):
    server = Server(tiny_cls, "--spec", "BAAI/llm-embedder", "--served-model-name", "llm-embedder",
                    "--reranker", str(tiny_ce), "--device", "cpu",
                    "--api-key", API_KEY, *SMALL, "--max-concurrent-requests", "4")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def reference(tiny_cls: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_cls), device="cpu", spec="BAAI/llm-embedder")


@pytest.fixture(scope="module")
def reference_ce(tiny_ce: Path) -> CrossEncoder:
    return CrossEncoder(str(tiny_ce), device="cpu")


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0)


def token_counts(model: SentenceTransformer, texts: list[str], prompt: str = "") -> list[int]:
    return [len(ids) for ids in model.tokenizer([prompt + text for text in texts])["input_ids"]]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_encode_vectors_and_token_usage(cpu_server, reference, encoding_format):
    response = openai_client(cpu_server).embeddings.create(input=TEXTS, model="llm-embedder",
                                                           encoding_format=encoding_format)
    if encoding_format == "base64":  # asked for explicitly, the client hands the string back; decode per OpenAI
        vectors = np.stack([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in response.data])
    else:
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(vectors, reference.encode(TEXTS), atol=1e-5, rtol=0)
    assert response.model == "llm-embedder"
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(token_counts(reference, TEXTS))


def test_openai_dimensions_cut_then_normalise(cpu_server, reference):
    response = openai_client(cpu_server).embeddings.create(input=TEXTS[:3], model="llm-embedder", dimensions=8)
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 8)
    np.testing.assert_allclose(vectors, unit(reference.encode(TEXTS[:3])[:, :8]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(vectors, reference.encode(TEXTS[:3], truncate_dim=8, normalize_embeddings=True),
                               atol=1e-5, rtol=0)


def test_openai_client_default_format_a_single_string_and_token_ids(cpu_server, reference):
    client = openai_client(cpu_server)
    response = client.embeddings.create(input="Hello world", model="llm-embedder")
    np.testing.assert_allclose(response.data[0].embedding, reference.encode(["Hello world"])[0], atol=1e-5, rtol=0)
    ids = reference.tokenizer(["Hello world", "Paris"])["input_ids"]
    response = client.embeddings.create(input=ids, model="llm-embedder")
    np.testing.assert_allclose([item.embedding for item in response.data], reference.encode(["Hello world", "Paris"]),
                               atol=1e-5, rtol=0)


def test_openai_auto_truncates_a_long_text(cpu_server, reference):
    long_text = "word " * 700
    response = openai_client(cpu_server).embeddings.create(input=long_text, model="llm-embedder")
    np.testing.assert_allclose(response.data[0].embedding, reference.encode(long_text), atol=1e-5, rtol=0)
    assert response.usage.prompt_tokens == 512


def test_tei_embed_prompt_normalize_dimensions_truncation(cpu_server, reference):
    body = {"inputs": TEXTS[:3], "prompt_name": "qa_query", "normalize": True}
    response = cpu_server.http.post("/embed", json=body).raise_for_status()
    vectors = np.array(response.json())
    np.testing.assert_allclose(vectors, reference.encode(TEXTS[:3], prompt_name="qa_query"), atol=1e-5, rtol=0)
    assert not np.allclose(vectors, reference.encode(TEXTS[:3]), atol=1e-3)  # the instruction was really added
    for header in ("x-compute-time", "x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0
    assert int(response.headers["x-compute-tokens"]) == sum(token_counts(reference, TEXTS[:3],
                                                                         reference.prompts["qa_query"]))

    raw = np.array(cpu_server.http.post("/embed", json={"inputs": TEXTS[:2], "normalize": False}).json())
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-3)  # the model's Normalize is not applied
    np.testing.assert_allclose(unit(raw), reference.encode(TEXTS[:2]), atol=1e-5, rtol=0)
    cut = np.array(cpu_server.http.post("/embed", json={"inputs": TEXTS[:2], "dimensions": 4}).json())
    np.testing.assert_allclose(cut, unit(raw[:, :4]), atol=1e-5, rtol=0)

    long_text = " ".join(f"w{index}" for index in range(700))
    right = cpu_server.http.post("/embed", json={"inputs": long_text, "truncate": True}).json()
    np.testing.assert_allclose(right, reference.encode([long_text]), atol=1e-5, rtol=0)
    left = cpu_server.http.post("/embed", json={"inputs": long_text, "truncation_direction": "Left"}).json()
    ids = reference.tokenizer(long_text, add_special_tokens=False)["input_ids"][-510:]
    np.testing.assert_allclose(left, reference.encode([reference.tokenizer.decode(ids)]), atol=1e-5, rtol=0)


def test_huggingface_inference_client(cpu_server, reference, monkeypatch):
    # offline mode (set for the whole suite, so no test reaches the hub) would block even a loopback server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=cpu_server.url, api_key=API_KEY, timeout=REQUEST_TIMEOUT_S)
    vector = client.feature_extraction("What is the capital of France?")
    np.testing.assert_allclose(np.asarray(vector).reshape(-1), reference.encode("What is the capital of France?"),
                               atol=1e-5, rtol=0)
    scores = client.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:3])
    vectors = reference.encode(TEXTS[:3])
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-5, rtol=0)
    endpoint = InferenceClient(model=cpu_server.url, provider="hf-inference", api_key=API_KEY)
    assert endpoint.health_check() is True
    assert endpoint.get_endpoint_info()["max_input_length"] == 512


def test_llama_index_tei_embedding(cpu_server, reference):
    embedder = TextEmbeddingsInference(model_name="tiny", base_url=cpu_server.url, auth_token=API_KEY,
                                       embed_batch_size=4)
    vectors = embedder.get_text_embedding_batch(TEXTS)
    np.testing.assert_allclose(vectors, reference.encode(TEXTS), atol=1e-5, rtol=0)


QUERY = "what is the capital of france"
DOCUMENTS = ["Paris is the capital of France.", "Berlin is in Germany.", "a b c " * 40, "短い文"]


def test_cohere_client_reranks_as_the_cross_encoder(cpu_server, reference_ce, tiny_ce):
    expected = reference_ce.predict([(QUERY, document) for document in DOCUMENTS])
    assert np.ptp(expected) > 1e-3  # distinct scores: the order is meaningful
    v1 = cohere.Client(base_url=cpu_server.url, api_key=API_KEY)  # POST /v1/rerank
    v2 = cohere.ClientV2(base_url=cpu_server.url, api_key=API_KEY)  # POST /v2/rerank, which returns no documents
    for response in (v1.rerank(model=str(tiny_ce), query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True),
                     v2.rerank(model=str(tiny_ce), query=QUERY, documents=DOCUMENTS, top_n=3)):
        assert [r.index for r in response.results] == list(np.argsort(-expected)[:3])
        np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(expected)[::-1][:3],
                                   atol=1e-5, rtol=0)
    with_text = v1.rerank(query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True).results
    assert [r.document.text for r in with_text] == [DOCUMENTS[r.index] for r in with_text]


def test_tei_rerank_predict_and_root(cpu_server, reference_ce):
    pairs = [(QUERY, document) for document in DOCUMENTS]
    expected = reference_ce.predict(pairs)
    ranks = cpu_server.http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True}).json()
    assert [rank["index"] for rank in ranks] == list(np.argsort(-expected))
    np.testing.assert_allclose([rank["score"] for rank in ranks], np.sort(expected)[::-1], atol=1e-5, rtol=0)
    assert [rank["text"] for rank in ranks] == [DOCUMENTS[rank["index"]] for rank in ranks]
    raw = cpu_server.http.post("/", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    logits = reference_ce.predict(pairs, activation_fn=__import__("torch").nn.Identity())
    np.testing.assert_allclose([rank["score"] for rank in sorted(raw, key=lambda r: r["index"])], logits,
                               atol=1e-5, rtol=0)
    predictions = cpu_server.http.post("/predict", json={"inputs": [list(pair) for pair in pairs[:2]]}).json()
    np.testing.assert_allclose([p[0]["score"] for p in predictions], expected[:2], atol=1e-5, rtol=0)
    assert predictions[0][0]["label"] == "LABEL_0"
    one = cpu_server.http.post("/predict", json={"inputs": list(pairs[0])}).json()
    np.testing.assert_allclose(one[0]["score"], expected[0], atol=1e-5, rtol=0)
    long_pair = cpu_server.http.post("/rerank", json={"query": QUERY * 60, "texts": ["word " * 600]})
    assert long_pair.status_code == 200 and 0 < long_pair.json()[0]["score"] < 1  # auto-truncated


def test_tokenize_decode_similarity_embed_all_and_models(cpu_server, reference):
    tokens = cpu_server.http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in tokens[0]] == reference.tokenizer("Hello world")["input_ids"]
    assert tokens[0][1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert cpu_server.http.post("/decode", json={"ids": [t["id"] for t in tokens[0]]}).json() == ["hello world"]
    similarity = cpu_server.http.post("/similarity", json={"inputs": {"source_sentence": TEXTS[0],
                                                                      "sentences": TEXTS[1:3]}}).json()
    vectors = reference.encode(TEXTS[:3])
    np.testing.assert_allclose(similarity, vectors[1:] @ vectors[0], atol=1e-5, rtol=0)
    token_vectors = cpu_server.http.post("/embed_all", json={"inputs": ["Hello world"]}).json()
    expected = reference.encode(["Hello world"], output_value="token_embeddings")[0]
    np.testing.assert_allclose(token_vectors[0], expected, atol=1e-5, rtol=0)
    models = cpu_server.http.get("/v1/models").json()["data"]
    assert [(m["id"].rsplit("/", 1)[-1], m["type"]) for m in models] == [("llm-embedder", "embed"),
                                                                         ("tiny-ce", "rerank")]


LONE_SURROGATE = b'{"inputs": "a\\ud800b", "input": "a\\ud800b", "query": "a\\ud800b", "texts": ["x"]}'
BAD_REQUESTS = [
    ("/embed", {"inputs": ["x"] * 9}, 413, "9 inputs, more than --max-client-batch-size 8"),
    ("/v1/embeddings", {"input": ["x"] * 9}, 413, "9 inputs"),
    ("/rerank", {"query": "q", "texts": ["x"] * 9}, 413, "9 texts"),
    ("/v1/rerank", {"query": "q", "documents": ["x"] * 9}, 413, "9 texts"),
    ("/embed", {"inputs": ["ok", "word " * 600], "truncate": False}, 413, "inputs[1] has more than 512 tokens"),
    ("/rerank", {"query": "q", "texts": ["word " * 600], "truncate": False}, 413, "more than 512 tokens"),
    ("/embed", {"inputs": []}, 422, "inputs is an empty list"),
    ("/v1/embeddings", {"input": []}, 422, "input is an empty list"),
    ("/rerank", {"query": "q", "texts": []}, 422, "texts is an empty list"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "documents is an empty list"),
    ("/embed", {"inputs": ["ok", 7]}, 422, "inputs[1] is int"),
    ("/v1/embeddings", {"input": ["ok", "ok", None]}, 422, "input[2] is NoneType"),
    ("/rerank", {"query": 3, "texts": ["x"]}, 422, "query is int"),
    ("/predict", {"inputs": "one text"}, 422, "must be a pair"),
    ("/similarity", {"inputs": "x"}, 422, "source_sentence"),
    ("/tokenize", {"inputs": [1]}, 422, "inputs[0] is int"),
    ("/decode", {"ids": ["a"]}, 422, "ids"),
    ("/embed", {"inputs": [[101, 40000]]}, 422, "not a token id"),
    ("/embed", b'{"inputs": ["unclosed"', 400, "malformed JSON"),
    ("/v1/embeddings", b"not json", 400, "malformed JSON"),
    ("/rerank", b"[1, 2]", 422, "must be a JSON object"),
    ("/embed", LONE_SURROGATE, 422, "lone surrogate"),
    ("/v1/embeddings", LONE_SURROGATE, 422, "lone surrogate"),
    ("/rerank", LONE_SURROGATE, 422, "lone surrogate"),
    ("/embed", {"inputs": "x", "prompt_name": "no_such_task"}, 422, "unknown prompt_name 'no_such_task'"),
    ("/v1/embeddings", {"input": "x", "prompt_name": "no_such_task"}, 422, "unknown prompt_name"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 422, "dimensions=0 is out of range"),
    ("/embed", {"inputs": "x", "dimensions": 33}, 422, "dimensions=33 is out of range"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "normalize must be true or false"),
    ("/embed", {"inputs": "x", "truncation_direction": "up"}, 422, "truncation_direction"),
    ("/v1/rerank", {"query": "q", "documents": ["x"], "top_n": 0}, 422, "top_n"),
    ("/embed_sparse", {"inputs": "x"}, 424, "sparse"),
    ("/no/such/route", {"inputs": "x"}, 404, "no route POST /no/such/route"),
    ("/v1/no-such-route", {"input": "x"}, 404, "no route"),
    ("/embed", b"x" * 2_000_001, 413, "--payload-limit"),
]


def post(server: Server, route: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.http.post(route, content=content, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, route: str, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if route.startswith("/v1/"):  # OpenAI's shape, which its client turns into an exception with the message
        assert message in error["message"] and error["code"] == str(status)
        assert error["type"] == "invalid_request_error" or status >= 424
    else:  # TEI's
        assert message in error and isinstance(response.json()["error_type"], str)


@pytest.mark.parametrize(("route", "body", "status", "message"), BAD_REQUESTS, ids=lambda v: str(v)[:30])
def test_bad_requests_get_clear_json_errors(cpu_server, route, body, status, message):
    assert_error(post(cpu_server, route, body), route, status, message)
    assert cpu_server.http.get("/health").status_code == 200


def test_openai_client_raises_with_the_message(cpu_server):
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions=64 is out of range"):
        openai_client(cpu_server).embeddings.create(input="x", model="llm-embedder", dimensions=64)


def test_a_reranker_alone_refuses_embedding_routes(tiny_ce, reference_ce):
    server = Server(None, "--reranker", str(tiny_ce), "--device", "cpu", *SMALL)
    try:
        info = server.http.get("/info").json()
        assert "reranker" in info["model_type"] and info["model_id"] == str(tiny_ce)
        for route, body in (("/embed", {"inputs": "x"}), ("/v1/embeddings", {"input": "x"}),
                            ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}})):
            assert_error(post(server, route, body), route, 424, "needs an embedding model")
        scores = server.http.post("/", json={"query": QUERY, "texts": DOCUMENTS[:2]}).json()
        expected = reference_ce.predict([(QUERY, document) for document in DOCUMENTS[:2]])
        np.testing.assert_allclose(sorted(rank["score"] for rank in scores), sorted(expected), atol=1e-5, rtol=0)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required(cpu_server, headers):
    with httpx.Client(base_url=cpu_server.url, timeout=REQUEST_TIMEOUT_S, headers=headers) as client:
        for route in ("/embed", "/v1/embeddings"):
            response = client.post(route, json={"inputs": "x", "input": "x"})
            assert response.status_code == 401 and "API key" in response.text
        assert client.get("/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cpu_server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            input="x", model="llm-embedder")


def test_health_info_and_metrics(cpu_server):
    info = cpu_server.http.get("/info").json()
    assert info["devices"] == ["cpu"] and info["max_input_length"] == 512 and info["embedding_dimension"] == 32
    assert info["model_type"] == {"embedding": {"pooling": "cls"}} and info["auto_truncate"] is True
    assert info["max_batch_tokens"] == 1024 and info["max_client_batch_size"] == 8 and "qa_query" in info["prompts"]
    assert info["reranker"]["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}
    before = cpu_server.metric('st_npu_tokens_total{model="llm-embedder"}')
    admitted = cpu_server.metric('st_npu_tokenizations_total{model="llm-embedder",stage="admission"}')
    cpu_server.http.post("/embed", json={"inputs": ["one two three"]}).raise_for_status()
    assert cpu_server.metric('st_npu_tokens_total{model="llm-embedder"}') == before + 5  # [CLS] one two three [SEP]
    assert cpu_server.metric('st_npu_tokenizations_total{model="llm-embedder",stage="admission"}') == admitted + 1
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
    assert "--max-concurrent-requests 4" in refused.json()["error"] and refused.json()["error_type"] == "overloaded"
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
            responses = list(pool.map(lambda texts: client.embeddings.create(input=texts, model=str(tiny_cls)),
                                      requests))
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
            assert server.metric(f'st_npu_batch_requests_count{{device="{device}",model="{tiny_cls}"') >= 1
        assert_error(post(server, "/rerank", {"query": "q", "texts": ["x"]}), "/rerank", 424, "needs a reranker")
        embedder = TextEmbeddingsInference(model_name="tiny", base_url=server.url, auth_token=API_KEY)
        np.testing.assert_allclose(embedder.get_text_embedding_batch(TEXTS), reference.encode(TEXTS), atol=1e-5,
                                   rtol=0)
    finally:
        assert server.stop() == 0


@needs_emulator
def test_a_reranker_on_an_emulated_npu_answers_the_cohere_client(tiny_ce, reference_ce, monkeypatch):
    server = Server(None, "--reranker", str(tiny_ce), "--reranker-devices", "npu:1", *SMALL, "--api-key", API_KEY,
                    emulate=2)
    try:
        assert server.http.get("/info").json()["devices"] == ["npu:1"]
        expected = reference_ce.predict([(QUERY, document) for document in DOCUMENTS])
        response = cohere.Client(base_url=server.url, api_key=API_KEY).rerank(
            model=str(tiny_ce), query=QUERY, documents=DOCUMENTS, top_n=2)
        assert [r.index for r in response.results] == list(np.argsort(-expected)[:2])
        np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(expected)[::-1][:2],
                                   atol=1e-5, rtol=0)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        client = InferenceClient(base_url=server.url, api_key=API_KEY, timeout=REQUEST_TIMEOUT_S)
        # POST / on a reranker alone is TEI's /predict, which takes pairs: a single text is refused with the reason
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="must be a pair"):
            client.feature_extraction("a reranker alone embeds nothing")
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


def test_bench_serve_reports_embed_and_rerank_for_both_servers(tiny_cls, tiny_ce, tmp_path):
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "st_npu", "bench-serve", "--model", str(tiny_cls), "--reranker", str(tiny_ce),
         "--device", "cpu", "--clients", "1,4", "--duration", "0.5", "--max-requests", "40", "--json", str(report)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    results = json.loads(report.read_text())["results"]
    assert [(r["workload"], r["clients"], r["server"]) for r in results] == [
        (workload, clients, server) for workload in ("embed", "rerank") for clients in (1, 4)
        for server in ("one-at-a-time", "batching")]
    assert all(0 < r["requests"] <= 40 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in results)
    # each text tokenised once, at admission (a rerank request: its query and four documents); the device call
    # takes those encodings as the call's tokens (Engine.tokens_from_ids) and tokenises nothing
    for r in results:
        assert r["tokenized_at_admission_per_request"] == (1 if r["workload"] == "embed" else 5)
        assert r["tokenized_in_device_call_per_request"] == 0
    assert "embed:" in result.stdout and "rerank:" in result.stdout and "| 4 |" in result.stdout
