"""``st-npu serve`` with a whole deployment in one process, started for real on 127.0.0.1: two embedders of
different dimensions, a reranker and a sparse (SPLADE) encoder, on the CPU and on the emulated npu, called with the
clients RAG stacks use (OpenAI's and Cohere's SDKs by the body's ``model``, huggingface_hub's InferenceClient and
LlamaIndex's TEI class per ``/models/{name}`` base URL); deadlines (504 before a device, counted); TEI's ``te_``
metrics; the 413 that urllib can read (SIGTERM's bound is test_serve_load's). Needs ``serve-test``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, needs_emulator

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai", "huggingface_hub", "cohere",
              "llama_index.embeddings.text_embeddings_inference"):
    pytest.importorskip(_name, reason=f'the server tests need {_name}: pip install "st-npu[serve-test]"')

import cohere  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import openai  # noqa: E402
import sentence_transformers  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference  # noqa: E402
from test_serve import API_KEY, REQUEST_TIMEOUT_S, Server, cross_encoder_folder, openai_client  # noqa: E402

from st_npu import SentenceTransformer  # noqa: E402
from st_npu.cli import main  # noqa: E402
from st_npu.errors import UsageError  # noqa: E402
from st_npu.serve.deployment import parse_model_option, read_deployment  # noqa: E402
from st_npu.testing.fixtures import TINY, TOKENIZER_FILES, bert_folder, minilm_folder  # noqa: E402

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "短い文", "a b c " * 30]
QUERY = "what is the capital of france"
DOCUMENTS = ["Paris is the capital of France.", "Berlin is in Germany.", "a b c " * 40, "短い文"]
WIDE = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
SMALL = ["--max-batch-size", "8", "--max-batch-tokens", "1024", "--max-client-batch-size", "8"]
# TEI's metric names (router/src/http/server.rs, core/src/infer.rs, core/src/queue.rs, core/src/tokenization.rs)
TEI_COUNTERS = ("te_request_count", "te_request_success", "te_request_failure", "te_embed_count", "te_embed_success",
                "te_predict_count", "te_predict_success")
TEI_HISTOGRAMS = ("te_request_duration", "te_request_tokenization_duration", "te_request_queue_duration",
                  "te_request_inference_duration", "te_request_input_length", "te_embed_duration",
                  "te_embed_tokenization_duration", "te_embed_queue_duration", "te_embed_inference_duration",
                  "te_predict_duration", "te_predict_tokenization_duration", "te_predict_queue_duration",
                  "te_predict_inference_duration", "te_batch_next_size", "te_batch_next_tokens")


def splade_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny SPLADE model (BertForMaskedLM with random weights, SpladePooling), saved as stock saves it."""
    import torch
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    mlm = folder.parent / f"{folder.name}-mlm"
    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY)).eval().save_pretrained(mlm)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, mlm / name)
    sentence_transformers.SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling("max")],
                                        device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("deployment")
    return {"small": bert_folder(base / "small", TINY, pooling="cls"),
            "wide": bert_folder(base / "wide", WIDE, pooling="mean", seed=1),
            "ce": cross_encoder_folder(base / "ce"), "sp": splade_folder(base / "sp")}


@pytest.fixture(scope="module", params=["cpu", pytest.param("npu", marks=needs_emulator)])
def deployment(request, folders):
    """Four models in one server; on the emulated npu, the reranker shares both npus with the embedders. The sparse
    model stays on the CPU there: the engine's warm-up asks stock's encode for sparse tensors, which the emulated
    npu cannot hold."""
    if request.param == "cpu":
        devices = {name: "cpu" for name in folders}
    else:
        devices = {"small": "npu:0", "wide": "npu:1", "ce": "npu:0,npu:1", "sp": "cpu"}
    options = [item for name, path in folders.items()
               for item in ("--model", f"{name}={path},devices={devices[name]}")]
    server = Server(None, *options, "--api-key", API_KEY, *SMALL, emulate=2 if request.param == "npu" else None)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def references(folders) -> dict[str, object]:
    return {"small": SentenceTransformer(str(folders["small"]), device="cpu"),
            "wide": SentenceTransformer(str(folders["wide"]), device="cpu"),
            "ce": sentence_transformers.CrossEncoder(str(folders["ce"]), device="cpu"),
            "sp": sentence_transformers.SparseEncoder(str(folders["sp"]), device="cpu")}


def test_models_listed_with_their_kinds_and_each_prefix_describes_its_model(deployment):
    models = deployment.http.get("/v1/models").json()["data"]
    assert [(m["id"], m["type"]) for m in models] == [("small", "embed"), ("wide", "embed"), ("ce", "rerank"),
                                                      ("sp", "sparse")]
    assert deployment.http.get("/health").status_code == 200
    info = {name: deployment.http.get(f"/models/{name}/info").json() for name in ("small", "wide", "ce", "sp")}
    assert [info[name]["embedding_dimension"] for name in ("small", "wide")] == [32, 48]
    assert info["small"]["model_type"] == {"embedding": {"pooling": "cls"}}
    assert "reranker" in info["ce"]["model_type"] and info["sp"]["model_type"] == {"embedding": {"pooling": "splade"}}
    assert deployment.http.get("/info").json()["model_id"] == "small"  # unprefixed: the first embedder
    for name in info:
        assert deployment.http.get(f"/models/{name}/health").status_code == 200


def test_openai_client_gets_each_named_models_vectors(deployment, references):
    client = openai_client(deployment)
    for name in ("small", "wide"):
        response = client.embeddings.create(input=TEXTS, model=name)
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
        assert response.model == name and vectors.shape[1] == {"small": 32, "wide": 48}[name]
        np.testing.assert_allclose(vectors, references[name].encode(TEXTS, normalize_embeddings=True), atol=1e-5,
                                   rtol=0)
    with pytest.raises(openai.NotFoundError, match="no model 'nope' is served here.*small, wide"):
        client.embeddings.create(input="x", model="nope")
    with pytest.raises(openai.NotFoundError, match="'ce' is a reranker"):
        client.embeddings.create(input="x", model="ce")
    response = deployment.http.post("/v1/embeddings", json={"input": "x"})  # two embedders: the model must be named
    assert response.status_code == 422 and "small, wide" in response.json()["error"]["message"]


def test_cohere_client_reranks_with_the_reranker(deployment, references):
    expected = references["ce"].predict([(QUERY, document) for document in DOCUMENTS])
    assert np.ptp(expected) > 1e-3
    for client in (cohere.Client(base_url=deployment.url, api_key=API_KEY),
                   cohere.ClientV2(base_url=deployment.url, api_key=API_KEY)):
        response = client.rerank(model="ce", query=QUERY, documents=DOCUMENTS, top_n=3)
        assert [r.index for r in response.results] == list(np.argsort(-expected)[:3])
        np.testing.assert_allclose([r.relevance_score for r in response.results], np.sort(expected)[::-1][:3],
                                   atol=1e-5, rtol=0)
    missing = deployment.http.post("/v1/rerank", json={"model": "small", "query": "q", "documents": ["x"]})
    assert missing.status_code == 404 and "rerankers: ce" in missing.json()["error"]["message"]


def test_tei_clients_per_model_base_url(deployment, references, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # loopback only; offline blocks it
    for name in ("small", "wide"):
        base = f"{deployment.url}/models/{name}"
        expected = references[name].encode(TEXTS, normalize_embeddings=True)
        client = InferenceClient(base_url=base, api_key=API_KEY, timeout=REQUEST_TIMEOUT_S)
        np.testing.assert_allclose(np.asarray(client.feature_extraction(TEXTS[0])).reshape(-1), expected[0],
                                   atol=1e-5, rtol=0)
        endpoint = InferenceClient(model=base, provider="hf-inference", api_key=API_KEY)
        assert endpoint.health_check() is True and endpoint.get_endpoint_info()["model_id"] == name
        embedder = TextEmbeddingsInference(model_name=name, base_url=base, auth_token=API_KEY, embed_batch_size=3)
        np.testing.assert_allclose(embedder.get_text_embedding_batch(TEXTS), expected, atol=1e-5, rtol=0)
    ranks = deployment.http.post("/models/ce/rerank", json={"query": QUERY, "texts": DOCUMENTS}).json()
    expected = references["ce"].predict([(QUERY, document) for document in DOCUMENTS])
    assert [rank["index"] for rank in ranks] == list(np.argsort(-expected))
    wrong = deployment.http.post("/models/ce/embed", json={"inputs": "x"})
    assert wrong.status_code == 424 and "needs an embedding model" in wrong.json()["error"]


def test_embed_sparse_gives_stock_sparse_encoders_non_zero_entries(deployment, references):
    expected = references["sp"].encode(TEXTS, convert_to_sparse_tensor=False).numpy()
    for route in ("/models/sp/embed_sparse", "/embed_sparse"):
        answer = deployment.http.post(route, json={"inputs": TEXTS}).raise_for_status().json()
        assert len(answer) == len(TEXTS)
        for row, entries in zip(expected, answer):
            assert [entry["index"] for entry in entries] == np.flatnonzero(row).tolist()
            np.testing.assert_allclose([entry["value"] for entry in entries], row[row != 0], atol=1e-5, rtol=0)
    refused = deployment.http.post("/models/sp/embed", json={"inputs": "x"})
    assert refused.status_code == 424 and "/embed_sparse" in refused.json()["error"]
    assert refused.json()["error_type"] == "backend"


def _samples(server: Server) -> dict[str, list[str]]:
    samples: dict[str, list[str]] = {}
    for line in server.http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            samples.setdefault(name, []).append(line)
    return samples


def test_tei_metric_names_labels_and_buckets_after_requests(deployment):
    deployment.http.post("/models/small/embed", json={"inputs": ["one two three"]}).raise_for_status()
    deployment.http.post("/rerank", json={"query": "q", "texts": ["a", "b"]}).raise_for_status()
    assert deployment.http.post("/models/small/embed", json={"inputs": []}).status_code == 422
    samples = _samples(deployment)
    for name in TEI_COUNTERS:
        assert name in samples, name
    for name in TEI_HISTOGRAMS:
        assert f"{name}_bucket" in samples and f"{name}_count" in samples, name
    assert 'te_queue_size{model="small"} 0.0' in samples["te_queue_size"]
    assert any(line.startswith('te_request_count{method="batch",model="small"}') and float(line.split()[-1]) >= 1
               for line in samples["te_request_count"])
    assert any(line.startswith('te_request_failure{err="validation",model="small"}') and float(line.split()[-1]) >= 1
               for line in samples["te_request_failure"])
    assert any('model="ce"' in line and float(line.split()[-1]) >= 2 for line in samples["te_predict_count"])
    # TEI's buckets: powers of two for batch sizes (to 4096), 10 us x 1.5^k for durations
    bounds = [line.split('le="', 1)[1].split('"', 1)[0] for line in samples["te_batch_next_size_bucket"]
              if 'model="small"' in line]
    assert bounds == [f"{2.0 ** k}" for k in range(13)] + ["+Inf"]
    first = next(line for line in samples["te_request_duration_bucket"] if 'model="small"' in line)
    assert float(first.split('le="', 1)[1].split('"', 1)[0]) == pytest.approx(1.5e-5)


def test_a_10_mb_body_through_urllib_gets_the_413(deployment):
    request = urllib.request.Request(f"{deployment.url}/embed", data=b"x" * 10_000_000, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)
    assert caught.value.code == 413 and "--payload-limit" in json.loads(caught.value.read())["error"]


# --- deadlines, on a model slow enough that requests queue -----------------------------------------

SLOW_TEXTS = ["word " * 500] * 8  # one request = one batch of 8 x 512 tokens


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    shape = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
    return bert_folder(tmp_path_factory.mktemp("slow") / "slow", shape)


def _slow_server(folder: Path, *args: str) -> Server:
    return Server(None, "--model", f"slow={folder}", "--device", "cpu", "--max-batch-size", "8",
                  "--max-client-batch-size", "8", "--api-key", API_KEY, *args, env={"OMP_NUM_THREADS": "1"})


def test_requests_past_their_deadline_get_504_and_never_reach_the_device(slow_folder):
    server = _slow_server(slow_folder, "--request-timeout", "1")
    try:
        def call(index: int) -> tuple[str, object]:
            route = "/v1/embeddings" if index % 2 else "/embed"
            body = {"input": SLOW_TEXTS} if index % 2 else {"inputs": SLOW_TEXTS}
            return route, server.http.post(route, json=body)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(call, index) for index in range(16)]
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while server.metric("st_npu_requests_in_progress") < 16 and time.monotonic() < deadline:
                time.sleep(0.01)
            late = server.http.post("/embed", json={"inputs": ["a request within its own deadline"]},
                                    headers={"x-request-timeout": "60"})
            answers = [future.result(timeout=REQUEST_TIMEOUT_S) for future in futures]
        assert late.status_code == 200
        statuses = [response.status_code for _, response in answers]
        assert set(statuses) <= {200, 504} and 504 in statuses, statuses
        for route, response in answers:
            if response.status_code == 504:
                error = response.json()["error"]
                assert "deadline" in (error["message"] if route.startswith("/v1/") else error)
        expired = statuses.count(504)
        # the device computed the answered requests' rows and nothing else: the expired ones never reached it
        assert server.metric('st_npu_batch_size_sum{device="cpu",model="slow"}') == 8 * statuses.count(200) + 1
        assert server.metric('st_npu_requests_expired_total{model="slow"}') == expired
        assert server.metric('te_request_failure{err="deadline",model="slow"}') == expired
        bad = server.http.post("/embed", json={"inputs": "x"}, headers={"x-request-timeout": "soon"})
        assert bad.status_code == 422 and "x-request-timeout" in bad.json()["error"]
    finally:
        assert server.stop() == 0


# --- the options ---------------------------------------------------------------------------------------------

def test_model_options_and_deployment_files(tmp_path):
    entry = parse_model_option("emb=BAAI/bge-m3,devices=npu:0,npu:1,dtype=float16,max_batch_tokens=8192")
    assert (entry.name, entry.path, entry.devices, entry.dtype, entry.max_batch_tokens) == (
        "emb", "BAAI/bge-m3", ("npu:0", "npu:1"), "float16", 8192)
    assert parse_model_option(entry.option()) == entry
    file = tmp_path / "deployment.toml"
    file.write_text('[[models]]\nname = "emb"\npath = "/models/bge-m3"\ndevices = ["npu:0"]\n\n'
                    '[[models]]\nname = "rerank"\npath = "/models/bge-reranker"\ndevices = "npu:1"\n'
                    'max-batch-size = 16\n', encoding="utf-8")
    entries = read_deployment(file)
    assert [(e.name, e.devices, e.max_batch_size) for e in entries] == [("emb", ("npu:0",), None),
                                                                        ("rerank", ("npu:1",), 16)]
    for text, message in (("emb=x,colour=red", "'colour=red' is not one of"),
                          ("emb=x,devices=npu:0,npu:0", "names a device twice"),
                          ("emb=x,max_batch_size=0", "positive integer")):
        with pytest.raises(UsageError, match=message):
            parse_model_option(text)
    file.write_text('[[models]]\nname = "emb"\n', encoding="utf-8")
    with pytest.raises(UsageError, match="needs name and path"):
        read_deployment(file)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "a", "--model", "b"], "without a name"),
    (["--model", "x=/nonexistent-a", "--model", "x=/nonexistent-b"], "given more than once: x"),
    (["--model", "x=/nonexistent-a", "--devices", "npu:0,npu:1"], "--devices goes with the one-model form"),
])
def test_bad_model_options_are_one_line_usage_errors(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_serve_mixed_load_reports_each_model_alone_and_together(folders, tmp_path):
    report = tmp_path / "mixed.json"
    result = subprocess.run(
        [sys.executable, "-m", "st_npu", "bench-serve", "--model", f"small={folders['small']}",
         "--model", f"ce={folders['ce']}", "--device", "cpu", "--clients", "2", "--duration", "0.5",
         "--max-requests", "20", "--json", str(report)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads(report.read_text())["results"]
    assert sorted((r["model"], r["server"]) for r in results) == [("ce", "alone"), ("ce", "together"),
                                                                  ("small", "alone"), ("small", "together")]
    assert all(0 < r["requests"] <= 20 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in results)
    assert "| small | embed | 2 |" in result.stdout and "| ce | rerank | 2 |" in result.stdout
