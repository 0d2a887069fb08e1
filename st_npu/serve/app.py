"""The HTTP routes: text-embeddings-inference's, OpenAI's embeddings and Cohere's (Jina's) rerank, for one embedder
and/or one reranker.

Each request is checked here (:mod:`st_npu.serve.protocol`), tokenised once on the tokenisation pool
(:mod:`st_npu.serve.tokens`): counted, cut to the model's limit or refused; then queued on its model's
:class:`~st_npu.serve.batcher.Batcher` with its encodings. While it waits, the route watches the connection: a
client that goes away has its request dropped before its rows reach a device. Answers carry TEI's timing headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from st_npu import __version__
from st_npu.serve import protocol
from st_npu.serve.batcher import Batcher, Job, QueueFull
from st_npu.serve.gate import Gate
from st_npu.serve.protocol import ApiError, error_response, json_response
from st_npu.serve.tokens import Tokenization, TooLong

POST_ROUTES = ("/", "/embed", "/embed_all", "/embed_sparse", "/predict", "/rerank", "/similarity", "/tokenize",
               "/decode", "/embeddings", "/v1/embeddings", "/v1/rerank", "/v2/rerank")
GET_ROUTES = ("/health", "/ping", "/info", "/metrics", "/v1/models")


@dataclass(frozen=True)
class Settings:
    """TEI's router options, with TEI's defaults."""

    max_client_batch_size: int = 32
    auto_truncate: bool = True
    payload_limit: int = 2_000_000
    api_key: str | None = None
    tokenization_workers: int = 1
    graceful_timeout: float = 30.0


@dataclass
class Served:
    """One model behind its batcher, with its name and its tokenisation pool."""

    batcher: Batcher
    name: str
    tokens: Tokenization

    @property
    def model(self) -> Any:
        return self.batcher.models[0]


@dataclass
class Outcome:
    results: list[Any]
    tokens: int
    characters: int
    tokenization_s: float
    job: Job


def create_app(embedder: Served | None, reranker: Served | None, metrics: Any, settings: Settings) -> Any:
    if embedder is None and reranker is None:
        raise ValueError("a server needs an embedder, a reranker or both")
    from st_npu import _compat

    served = [item for item in (embedder, reranker) if item is not None]
    dimension = _compat.embedding_dimension(embedder.model) if embedder else None
    labels = _labels(reranker.model) if reranker else []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for item in served:  # warm-up runs in the device workers; /health says 503 until it is done
            item.batcher.start()
        yield
        # uvicorn has answered or dropped every request by now (within --graceful-timeout): stop the devices
        for item in served:
            await asyncio.to_thread(item.batcher.close, settings.graceful_timeout)
            item.tokens.close()

    app = FastAPI(title="st-npu serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # 404, 405 in the API's shape
        kind = "not_found" if exc.status_code == 404 else "validation"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return error_response(request.url.path, ApiError(exc.status_code, str(message), kind=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:  # a bug still answers in the API's shape
        return error_response(request.url.path, ApiError(424, f"{type(exc).__name__}: {exc}", kind="backend"))

    # --- the steps every model route takes ----------------------------------------------------------------------

    def need(item: Served | None, what: str, route: str) -> Served:
        if item is None:
            given = "an embedding model (--model)" if what == "embedding" else "a reranker (--reranker)"
            raise ApiError(424, f"{route} needs {given}; this server serves "
                                f"{' and '.join(f'{x.batcher.kind} model {x.name}' for x in served)}",
                           kind="backend")
        return item

    async def tokenise(item: Served, method: Any, *args: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            admitted = await loop.run_in_executor(item.tokens.executor, item.tokens.run, method, *args)
        except TooLong as exc:
            raise ApiError(413, str(exc)) from None
        except ValueError as exc:
            raise ApiError(422, str(exc), kind="tokenizer") from None
        metrics.tokenizations.labels(item.batcher.kind, "admission").inc(admitted.tokenized)
        return admitted, time.perf_counter() - started

    async def run(item: Served, request: Request, admitted: Any, options: tuple, tokenization_s: float,
                  characters: int) -> Outcome:
        job = Job(admitted.rows, admitted.encodings, options)
        try:
            future = item.batcher.submit(job)
        except QueueFull as exc:
            status = 503 if "shutting down" in str(exc) else 429
            raise ApiError(status, f"{exc}; retry later", kind="overloaded" if status == 429 else "unhealthy") from None
        metrics.in_progress.inc()
        waiter = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping past its graceful timeout: answer if still possible
            item.batcher.abandon(job)
            raise ApiError(503, "the server stopped (--graceful-timeout) before this request was computed",
                           kind="unhealthy") from None
        finally:
            gone.cancel()
            metrics.in_progress.dec()
        if not waiter.done():
            item.batcher.abandon(job)
            metrics.abandoned.labels(item.batcher.kind).inc()
            raise ApiError(499, "the client closed the connection", kind="cancelled")
        if waiter.cancelled():
            raise ApiError(503, "the server stopped before this request reached a device", kind="unhealthy")
        error = waiter.exception()
        if isinstance(error, QueueFull):
            raise ApiError(503, str(error), kind="unhealthy")
        if error is not None:
            raise ApiError(424, f"inference failed: {type(error).__name__}: {error}", kind="backend")
        metrics.tokens.labels(item.batcher.kind).inc(admitted.tokens)
        return Outcome(list(waiter.result()), admitted.tokens, characters, tokenization_s, job)

    async def embed(request: Request, body: dict[str, Any], field: str, output: str = "sentence",
                    truncate: bool | None = None) -> Outcome:
        item = need(embedder, "embedding", request.url.path)
        if field not in body:
            raise ApiError(422, f"missing field {field!r}", field)
        texts, ids = protocol.texts_or_ids(body[field], field, settings.max_client_batch_size)
        prompt_name = protocol.optional(body, "prompt_name", str)
        model = item.model
        if prompt_name is not None and prompt_name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise ApiError(422, f"unknown prompt_name {protocol.shown(prompt_name)}; this model's prompts: {known}",
                           "prompt_name")
        truncate = protocol.flag(body, "truncate", settings.auto_truncate) if truncate is None else truncate
        left = protocol.left_truncation(body)
        limit = _limit(item, prompt_name or model.default_prompt_name)
        if texts is not None:
            prompt = model.prompts.get(prompt_name or model.default_prompt_name or "", "")
            admitted, took = await tokenise(item, item.tokens.texts, texts, prompt, limit, truncate, left, field)
            return await run(item, request, admitted, (prompt_name, output), took, sum(map(len, texts)))
        admitted, took = await tokenise(item, item.tokens.ids, ids, limit, truncate, left, field)
        return await run(item, request, admitted, (None, output), took, 0)  # the ids are the whole model input

    async def score(request: Request, query: Any, texts: list[str], field: str, body: dict[str, Any]) -> Outcome:
        item = need(reranker, "rerank", request.url.path)
        query = protocol.check_text(query, "query")
        truncate = protocol.flag(body, "truncate", settings.auto_truncate)
        left = protocol.left_truncation(body)
        admitted, took = await tokenise(item, item.tokens.pairs, [(query, text) for text in texts],
                                        _limit(item, None), truncate, left, field)
        return await run(item, request, admitted, ("pairs",), took, len(query) * len(texts) + sum(map(len, texts)))

    def vectors(outcome: Outcome, normalize: bool, size: int | None) -> np.ndarray:
        """The pooled vectors as TEI gives them: cut to ``size`` dimensions, then normalised if asked."""
        rows = np.stack(outcome.results)[:, :size] if size else np.stack(outcome.results)
        if normalize:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        return rows.astype(np.float32)

    def answer(content: Any, outcome: Outcome, started: float) -> Response:
        job = outcome.job
        queue_s = (job.started_at or job.queued_at) - job.queued_at
        total_ms = (time.perf_counter() - started) * 1000
        headers = {"x-compute-type": "+".join(sorted({str(m.device) for item in served for m in item.batcher.models})),
                   "x-compute-time": f"{total_ms:.3f}", "x-total-time": f"{total_ms:.3f}",
                   "x-compute-characters": str(outcome.characters), "x-compute-tokens": str(outcome.tokens),
                   "x-tokenization-time": f"{outcome.tokenization_s * 1000:.3f}",
                   "x-queue-time": f"{queue_s * 1000:.3f}", "x-inference-time": f"{job.compute_s * 1000:.3f}"}
        return json_response(content, headers=headers)

    def route(path: str, handler: Any) -> None:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                return await handler(request, protocol.parse_object(await request.body()), started)
            except ApiError as exc:
                return error_response(path, exc)

        app.add_api_route(path, endpoint, methods=["POST"], name=path)

    # --- text-embeddings-inference ------------------------------------------------------------------------------

    async def tei_embed(request: Request, body: dict[str, Any], started: float) -> Response:
        size = protocol.dimensions(body, dimension) if embedder else None
        outcome = await embed(request, body, "inputs")
        return answer(vectors(outcome, protocol.flag(body, "normalize", True), size).tolist(), outcome, started)

    async def tei_embed_all(request: Request, body: dict[str, Any], started: float) -> Response:
        outcome = await embed(request, body, "inputs", output="tokens")
        return answer([np.asarray(rows, dtype=np.float32).tolist() for rows in outcome.results], outcome, started)

    async def tei_embed_sparse(request: Request, body: dict[str, Any], started: float) -> Response:
        raise ApiError(424, "/embed_sparse needs a sparse (SPLADE) model: this server serves none", kind="backend")

    async def tei_rerank(request: Request, body: dict[str, Any], started: float) -> Response:
        need(reranker, "rerank", request.url.path)
        texts = protocol.text_list(body.get("texts"), "texts", settings.max_client_batch_size)
        outcome = await score(request, body.get("query"), texts, "texts", body)
        raw = np.asarray(outcome.results, dtype=np.float64).reshape(len(texts), -1)[:, 0]
        scores = raw if protocol.flag(body, "raw_scores", False) else _sigmoid(raw)
        return_text = protocol.flag(body, "return_text", False)
        ranks = [{"index": int(index), "score": float(scores[index]), **({"text": texts[index]} if return_text else {})}
                 for index in np.argsort(-scores, kind="stable")]
        return answer(ranks, outcome, started)

    async def tei_predict(request: Request, body: dict[str, Any], started: float) -> Response:
        item = need(reranker, "rerank", request.url.path)
        single, pairs = _predict_pairs(body.get("inputs"), settings.max_client_batch_size)
        truncate = protocol.flag(body, "truncate", settings.auto_truncate)
        left = protocol.left_truncation(body)
        admitted, took = await tokenise(item, item.tokens.pairs, pairs, _limit(item, None), truncate, left, "inputs")
        outcome = await run(item, request, admitted, ("pairs",), took, sum(len(a) + len(b) for a, b in pairs))
        raw = np.asarray(outcome.results, dtype=np.float64).reshape(len(pairs), -1)
        scores = raw if protocol.flag(body, "raw_scores", False) else _activate(raw)
        predictions = [sorted(({"score": float(value), "label": labels[index]} for index, value in enumerate(row)),
                              key=lambda entry: -entry["score"]) for row in scores]
        return answer(predictions[0] if single else predictions, outcome, started)

    async def tei_similarity(request: Request, body: dict[str, Any], started: float) -> Response:
        inputs = body.get("inputs")
        if not isinstance(inputs, dict) or "source_sentence" not in inputs or "sentences" not in inputs:
            raise ApiError(422, "inputs must be an object with source_sentence and sentences", "inputs")
        source = protocol.check_text(inputs["source_sentence"], "inputs.source_sentence")
        sentences = protocol.text_list(inputs["sentences"], "inputs.sentences", settings.max_client_batch_size - 1)
        parameters = protocol.optional(body, "parameters", dict, {})
        outcome = await embed(request, {**parameters, "inputs": [source, *sentences]}, "inputs")
        rows = vectors(outcome, True, None)
        return answer((rows[1:] @ rows[0]).astype(float).tolist(), outcome, started)

    async def tei_tokenize(request: Request, body: dict[str, Any], started: float) -> Response:
        item = embedder or reranker
        texts = protocol.text_list(body.get("inputs"), "inputs", settings.max_client_batch_size)
        special = protocol.flag(body, "add_special_tokens", True)
        prompt_name = protocol.optional(body, "prompt_name", str)
        prompts = getattr(item.model, "prompts", {}) or {}
        if prompt_name is not None and prompt_name not in prompts:
            raise ApiError(422, f"unknown prompt_name {protocol.shown(prompt_name)}", "prompt_name")
        prompt = prompts.get(prompt_name, "") if prompt_name else ""
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(item.tokens.executor, item.tokens.run, _tokens, [prompt + t for t in texts],
                                            special)
        return json_response(tokens)

    async def tei_decode(request: Request, body: dict[str, Any], started: float) -> Response:
        item = embedder or reranker
        ids = body.get("ids")
        sequences = [ids] if isinstance(ids, list) and ids and all(map(protocol.is_token_id, ids)) else ids
        if not isinstance(sequences, list) or not sequences or not all(
                isinstance(seq, list) and seq and all(map(protocol.is_token_id, seq)) for seq in sequences):
            raise ApiError(422, "ids must be a non-empty list of token ids (integers) or a list of such lists", "ids")
        if len(sequences) > settings.max_client_batch_size:
            raise ApiError(413, f"ids has {len(sequences)} sequences, more than --max-client-batch-size "
                                f"{settings.max_client_batch_size}; split the request", "ids")
        skip = protocol.flag(body, "skip_special_tokens", True)
        size = item.tokens.vocab_size
        for index, sequence in enumerate(sequences):
            if any(not 0 <= token < size for token in sequence):
                raise ApiError(422, f"ids[{index}] holds a token id outside this model's vocabulary (0 to "
                                    f"{size - 1})", "ids")
        loop = asyncio.get_running_loop()
        texts = await loop.run_in_executor(item.tokens.executor, item.tokens.run,
                                           lambda tok: [tok.decode(seq, skip_special_tokens=skip) for seq in sequences])
        return json_response(texts)

    async def tei_root(request: Request, body: dict[str, Any], started: float) -> Response:
        """TEI's ``POST /``, which huggingface_hub's InferenceClient calls: by the body and the model served."""
        if "query" in body and "texts" in body:
            return await tei_rerank(request, body, started)
        if isinstance(body.get("inputs"), dict):
            return await tei_similarity(request, body, started)
        if embedder is not None:
            return await tei_embed(request, body, started)
        return await tei_predict(request, body, started)

    # --- OpenAI and Cohere/Jina ---------------------------------------------------------------------------------

    async def openai_embeddings(request: Request, body: dict[str, Any], started: float) -> Response:
        need(embedder, "embedding", request.url.path)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {protocol.shown(encoding)}",
                           "encoding_format")
        size = protocol.dimensions(body, dimension)
        protocol.optional(body, "model", str)
        outcome = await embed(request, body, "input", truncate=settings.auto_truncate)
        rows = vectors(outcome, True, size)
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                 if encoding == "base64" else row.tolist()} for index, row in enumerate(rows)]
        return answer({"object": "list", "data": data, "model": body.get("model") or embedder.name,
                       "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens}}, outcome, started)

    async def cohere_rerank(request: Request, body: dict[str, Any], started: float) -> Response:
        need(reranker, "rerank", request.url.path)
        documents = body.get("documents")
        if isinstance(documents, list):  # Cohere's v1 also takes {"text": ...} objects
            documents = [item["text"] if isinstance(item, dict) and "text" in item else item for item in documents]
        texts = protocol.text_list(documents, "documents", settings.max_client_batch_size)
        top_n = protocol.optional(body, "top_n", int, len(texts))
        if top_n < 1:
            raise ApiError(422, f"top_n must be at least 1, got {top_n}", "top_n")
        outcome = await score(request, body.get("query"), texts, "documents", body)
        scores = _sigmoid(np.asarray(outcome.results, dtype=np.float64).reshape(len(texts), -1)[:, 0])
        with_documents = protocol.flag(body, "return_documents", False)
        results = [{"index": int(index), "relevance_score": float(scores[index]),
                    **({"document": {"text": texts[index]}} if with_documents else {})}
                   for index in np.argsort(-scores, kind="stable")[:top_n]]
        return answer({"id": str(uuid.uuid4()), "results": results, "model": body.get("model") or reranker.name,
                       "usage": {"total_tokens": outcome.tokens},
                       "meta": {"billed_units": {"search_units": 1}}}, outcome, started)

    for path, handler in (("/", tei_root), ("/embed", tei_embed), ("/embed_all", tei_embed_all),
                          ("/embed_sparse", tei_embed_sparse), ("/predict", tei_predict), ("/rerank", tei_rerank),
                          ("/similarity", tei_similarity), ("/tokenize", tei_tokenize), ("/decode", tei_decode),
                          ("/embeddings", openai_embeddings), ("/v1/embeddings", openai_embeddings),
                          ("/v1/rerank", cohere_rerank), ("/v2/rerank", cohere_rerank)):
        route(path, handler)

    # --- probes and descriptions --------------------------------------------------------------------------------

    @app.get("/health")
    @app.get("/ping")
    async def health() -> Response:
        if all(item.batcher.ready for item in served):
            return json_response({"status": "ok"})
        return error_response("/health", ApiError(503, "warming up: compiling the static shapes", kind="unhealthy"))

    @app.get("/info")
    async def info() -> Response:
        main = embedder or reranker
        description = _describe(main, settings, dimension, labels)
        if embedder and reranker:
            description["reranker"] = _describe(reranker, settings, None, labels)
        return json_response(description)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [
            {"id": item.name, "object": "model", "created": 0, "owned_by": "st-npu", "type": item.batcher.kind}
            for item in served]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return Gate(app, set(POST_ROUTES) | set(GET_ROUTES), settings.payload_limit, settings.api_key, metrics)


def _describe(item: Served, settings: Settings, dimension: int | None, labels: list[str]) -> dict[str, Any]:
    """TEI's ``/info`` fields, and st_npu's own (devices, static shapes) after them."""
    model, batcher = item.model, item.batcher
    kind = {"embedding": {"pooling": _pooling(model)}} if batcher.kind == "embed" else {
        "reranker": {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}}
    return {
        "model_id": item.name, "model_sha": None,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "model_type": kind,
        "max_concurrent_requests": batcher.max_concurrent_requests, "max_input_length": batcher.max_seq_length,
        "max_batch_tokens": batcher.max_batch_tokens, "max_batch_requests": batcher.max_batch_requests,
        "max_client_batch_size": settings.max_client_batch_size, "auto_truncate": settings.auto_truncate,
        "tokenization_workers": settings.tokenization_workers, "version": __version__, "sha": None,
        "docker_label": None,
        "devices": [str(m.device) for m in batcher.models], "static_shapes": batcher.static_shapes,
        "max_batch_size": batcher.max_batch_size, "embedding_dimension": dimension,
        "prompts": sorted(getattr(model, "prompts", {}) or {}), "ready": batcher.ready,
    }


def _pooling(model: Any) -> str:
    for module in model:
        config = getattr(module, "get_config_dict", lambda: {})()
        if isinstance(config.get("pooling_mode"), str):  # sentence-transformers 6
            return config["pooling_mode"]
        modes = [key.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                 for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
        if modes:
            return modes[0]
    return "unknown"


def _labels(model: Any) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {0: "LABEL_0"}
    return [str(id2label.get(index, id2label.get(str(index), f"LABEL_{index}"))) for index in range(len(id2label))]


def _limit(item: Served, prompt_name: str | None) -> int:
    """The token limit for a request: the model's, or a known model's lower one for this prompt's side."""
    side = getattr(item.model, "prompt_max_length", None)
    limit = side(prompt_name) if side and prompt_name else None
    return min(limit or item.batcher.max_seq_length, item.batcher.max_seq_length)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def _activate(raw: np.ndarray) -> np.ndarray:
    """TEI's scores: a sigmoid for one label, a softmax over several."""
    if raw.shape[1] == 1:
        return _sigmoid(raw)
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _predict_pairs(value: Any, max_batch: int) -> tuple[bool, list[tuple[str, str]]]:
    """TEI's ``/predict`` inputs as (first, second) pairs: ``[a, b]`` is one pair, ``[[a, b], ...]`` a batch."""
    def pair(item: Any, where: str) -> tuple[str, str]:
        if isinstance(item, list) and len(item) == 2:
            return protocol.check_text(item[0], f"{where}[0]"), protocol.check_text(item[1], f"{where}[1]")
        raise ApiError(422, f"{where} must be a pair [text, text_pair]: this server's reranker scores pairs "
                            f"(got {protocol.shown(item)})", "inputs")

    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        if len(value) > max_batch:
            raise ApiError(413, f"inputs has {len(value)} pairs, more than --max-client-batch-size {max_batch}; "
                                f"split the request", "inputs")
        return False, [pair(item, f"inputs[{index}]") for index, item in enumerate(value)]
    return True, [pair(value, "inputs")]


def _tokens(tokenizer: Any, texts: list[str], special: bool) -> list[list[dict[str, Any]]]:
    """TEI's ``/tokenize`` answer: per text, each token's id, text, whether it is special, and its span."""
    encoded = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True,
                        return_special_tokens_mask=True, verbose=False)
    answer = []
    for text, ids, offsets, specials in zip(texts, encoded["input_ids"], encoded["offset_mapping"],
                                            encoded["special_tokens_mask"]):
        answer.append([{"id": token, "text": tokenizer.convert_ids_to_tokens(token) if flag else text[start:stop],
                        "special": bool(flag), "start": None if flag else start, "stop": None if flag else stop}
                       for token, (start, stop), flag in zip(ids, offsets, specials)])
    return answer


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body was read already, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
