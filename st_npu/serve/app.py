"""The HTTP routes: text-embeddings-inference's, OpenAI's embeddings and Cohere's (Jina's) rerank, for any number
of models (embedders, rerankers, sparse encoders) in one server.

Routing: OpenAI's and Cohere's routes pick a model by the body's ``model`` (it may be left out where one model of
that kind is served); TEI's routes live under each model's own prefix, ``/models/{name}/``, so each TEI client gets
one base URL per model, and the unprefixed TEI routes serve the first model of the kind they need.

Each request is checked here (:mod:`st_npu.serve.protocol`), tokenised once on its model's tokenisation pool
(:mod:`st_npu.serve.tokens`): counted, cut to the model's limit or refused; then queued on its model's
:class:`~st_npu.serve.batcher.Batcher` with its encodings and its deadline (``--request-timeout``, or the request's
``x-request-timeout`` header, in seconds). While it waits, the route watches the connection and the deadline: a
request whose client went away, or whose deadline passed before any of its rows reached a device, is dropped (the
latter answered 504); one already on a device finishes. Answers carry TEI's timing headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from st_npu import __version__
from st_npu.serve import protocol
from st_npu.serve.batcher import Batcher, DeadlineExceeded, Job, QueueFull
from st_npu.serve.gate import Gate
from st_npu.serve.protocol import ApiError, error_response, json_response
from st_npu.serve.tokens import Tokenization, TooLong

TEI_POST_ROUTES = ("/embed", "/embed_all", "/embed_sparse", "/predict", "/rerank", "/similarity", "/tokenize",
                   "/decode", "/embeddings")
POST_ROUTES = ("/", *TEI_POST_ROUTES, "/v1/embeddings", "/v1/rerank", "/v2/rerank")
TEI_GET_ROUTES = ("/health", "/ping", "/info", "/metrics")
GET_ROUTES = (*TEI_GET_ROUTES, "/v1/models")
TIMEOUT_HEADER = "x-request-timeout"
KIND_NAMES = {"embed": "an embedding model", "rerank": "a reranker", "sparse": "a sparse (SPLADE) model"}


@dataclass(frozen=True)
class Settings:
    """TEI's router options, with TEI's defaults, and st_npu's deadline (None: requests wait as long as needed)."""

    max_client_batch_size: int = 32
    auto_truncate: bool = True
    payload_limit: int = 2_000_000
    api_key: str | None = None
    tokenization_workers: int = 1
    graceful_timeout: float = 30.0
    request_timeout: float | None = None


@dataclass
class Served:
    """One model behind its batcher, with its name and its tokenisation pool; ``routed``: it has its own
    ``/models/{name}/`` routes."""

    batcher: Batcher
    name: str
    tokens: Tokenization
    routed: bool = True

    @property
    def model(self) -> Any:
        return self.batcher.models[0]

    @property
    def kind(self) -> str:
        return self.batcher.kind


@dataclass
class Outcome:
    results: list[Any]
    tokens: int
    characters: int
    tokenization_s: float
    job: Job
    item: Served


@dataclass
class Call:
    """What one request's metrics need: its model (once known) and TEI's method (a single input or a batch)."""

    model: str | None = None
    method: str = "single"


class Scope:
    """The models one set of TEI routes answers for: one model's (under its prefix), or every model's (unprefixed:
    the first model of the kind a route needs)."""

    def __init__(self, models: list[Served], prefix: str = "") -> None:
        self.models, self.prefix = models, prefix

    def find(self, *kinds: str) -> Served | None:
        return next((item for item in self.models if item.kind in kinds), None)

    def pick(self, call: Call, route: str, *kinds: str) -> Served:
        item = self.find(*kinds)
        if self.prefix:
            call.model = self.models[0].name
        if item is None:
            wanted = " or ".join(KIND_NAMES[kind] for kind in kinds)
            here = ", ".join(f"{x.name} ({x.kind})" for x in self.models)
            hint = "; use /embed_sparse" if "embed" in kinds and self.find("sparse") else ""
            where = "this model is" if self.prefix else "this server serves"
            raise ApiError(424, f"{self.prefix}{route} needs {wanted}; {where} {here}{hint}", kind="backend",
                           err="model_type")
        call.model = item.name
        return item


def create_app(served: list[Served], metrics: Any, settings: Settings) -> Any:
    if not served:
        raise ValueError("a server needs at least one model")
    from st_npu import _compat

    names = [item.name for item in served]
    if len(set(names)) != len(names):
        raise ValueError(f"each model needs its own name, got {names}")
    dimensions = {item.name: _compat.embedding_dimension(item.model) for item in served if item.kind == "embed"}
    labels = {item.name: _labels(item.model) for item in served if item.kind == "rerank"}
    everything = Scope(served)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for item in served:  # warm-up runs in the device workers; /health says 503 until every model is done
            metrics.start_model(item.name, "predict" if item.kind == "rerank" else "embed")
            item.batcher.start()
        yield
        # uvicorn has answered or dropped every request by now (within --graceful-timeout): stop the devices, each
        # after the batch it is computing (at most one), all at once; whatever is still queued is dropped
        await asyncio.gather(*(asyncio.to_thread(item.batcher.close) for item in served))
        for item in served:
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

    def deadline_of(request: Request, started: float) -> float | None:
        given = request.headers.get(TIMEOUT_HEADER)
        if given is None:
            timeout = settings.request_timeout
        else:
            try:
                timeout = float(given)
            except ValueError:
                timeout = math.nan
            if not 0 < timeout < math.inf:
                raise ApiError(422, f"the {TIMEOUT_HEADER} header must be a positive number of seconds, got "
                                    f"{protocol.shown(given)}", TIMEOUT_HEADER)
        return None if timeout is None else started + timeout

    async def tokenise(item: Served, method: Any, *args: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            admitted = await loop.run_in_executor(item.tokens.executor, item.tokens.run, method, *args)
        except TooLong as exc:
            raise ApiError(413, str(exc), err="tokenization") from None
        except ValueError as exc:
            raise ApiError(422, str(exc), kind="tokenizer") from None
        metrics.tokenizations.labels(item.name, "admission").inc(admitted.tokenized)
        return admitted, time.perf_counter() - started

    def expired(item: Served, started: float, deadline: float) -> ApiError:
        metrics.expired.labels(item.name).inc()
        return ApiError(504, f"the request's deadline ({deadline - started:g} s: --request-timeout or the "
                             f"{TIMEOUT_HEADER} header) passed before it reached a device; it was not computed",
                        kind="timeout")

    async def run(item: Served, request: Request, admitted: Any, options: tuple, tokenization_s: float,
                  characters: int, started: float) -> Outcome:
        deadline = deadline_of(request, started)
        if deadline is not None and time.perf_counter() > deadline:
            raise expired(item, started, deadline)
        job = Job(admitted.rows, admitted.encodings, options, deadline=deadline)
        try:
            future = item.batcher.submit(job)
        except QueueFull as exc:
            status = 503 if item.batcher.failure is not None or "shutting down" in str(exc) else 429
            raise ApiError(status, f"{exc}; retry later", kind="overloaded" if status == 429 else "unhealthy") from None
        metrics.count("te_predict_count" if item.kind == "rerank" else "te_embed_count", item.name,
                      amount=len(job.rows))
        metrics.in_progress.inc()
        waiter = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                done, _ = await asyncio.wait({waiter, gone}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
                if item.batcher.expire(job):
                    raise expired(item, started, deadline)
                deadline = None  # some of its rows are on a device: it finishes
        except asyncio.CancelledError:  # the server is stopping past its graceful timeout: answer if still possible
            item.batcher.abandon(job)
            raise ApiError(503, "the server stopped (--graceful-timeout) before this request was computed",
                           kind="unhealthy") from None
        finally:
            gone.cancel()
            metrics.in_progress.dec()
        if not waiter.done():
            item.batcher.abandon(job)
            metrics.abandoned.labels(item.name).inc()
            raise ApiError(499, "the client closed the connection", kind="cancelled")
        if waiter.cancelled():
            raise ApiError(503, "the server stopped before this request reached a device", kind="unhealthy")
        error = waiter.exception()
        if isinstance(error, DeadlineExceeded):
            raise expired(item, started, job.deadline)
        if isinstance(error, QueueFull):
            raise ApiError(503, str(error), kind="unhealthy")
        if error is not None:
            raise ApiError(424, f"inference failed: {type(error).__name__}: {error}", kind="backend")
        metrics.tokens.labels(item.name).inc(admitted.tokens)
        return Outcome(list(waiter.result()), admitted.tokens, characters, tokenization_s, job, item)

    async def embed(item: Served, call: Call, request: Request, body: dict[str, Any], field: str, started: float,
                    output: str = "sentence", truncate: bool | None = None) -> Outcome:
        if field not in body:
            raise ApiError(422, f"missing field {field!r}", field)
        call.method = "single" if isinstance(body[field], str) or (
            isinstance(body[field], list) and all(map(protocol.is_token_id, body[field]))) else "batch"
        texts, ids = protocol.texts_or_ids(body[field], field, settings.max_client_batch_size)
        prompt_name = protocol.optional(body, "prompt_name", str)
        model = item.model
        prompts = getattr(model, "prompts", None) or {}
        default_prompt = getattr(model, "default_prompt_name", None)
        if prompt_name is not None and prompt_name not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise ApiError(422, f"unknown prompt_name {protocol.shown(prompt_name)}; this model's prompts: {known}",
                           "prompt_name")
        truncate = protocol.flag(body, "truncate", settings.auto_truncate) if truncate is None else truncate
        left = protocol.left_truncation(body)
        limit = _limit(item, prompt_name or default_prompt)
        if texts is not None:
            prompt = prompts.get(prompt_name or default_prompt or "", "")
            admitted, took = await tokenise(item, item.tokens.texts, texts, prompt, limit, truncate, left, field)
            return await run(item, request, admitted, (prompt_name, output), took, sum(map(len, texts)), started)
        admitted, took = await tokenise(item, item.tokens.ids, ids, limit, truncate, left, field)
        return await run(item, request, admitted, (None, output), took, 0, started)  # the ids are the model input

    async def score(item: Served, request: Request, query: Any, texts: list[str], field: str, body: dict[str, Any],
                    started: float) -> Outcome:
        query = protocol.check_text(query, "query")
        truncate = protocol.flag(body, "truncate", settings.auto_truncate)
        left = protocol.left_truncation(body)
        admitted, took = await tokenise(item, item.tokens.pairs, [(query, text) for text in texts],
                                        _limit(item, None), truncate, left, field)
        return await run(item, request, admitted, ("pairs",), took, len(query) * len(texts) + sum(map(len, texts)),
                         started)

    def vectors(outcome: Outcome, normalize: bool, size: int | None) -> np.ndarray:
        """The pooled vectors as TEI gives them: cut to ``size`` dimensions, then normalised if asked."""
        rows = np.stack(outcome.results)[:, :size] if size else np.stack(outcome.results)
        if normalize:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        return rows.astype(np.float32)

    def answer(content: Any, outcome: Outcome, started: float) -> Response:
        job, item = outcome.job, outcome.item
        queue_s = (job.started_at or job.queued_at) - job.queued_at
        total_s = time.perf_counter() - started
        metrics.observe_request(item.name, "predict" if item.kind == "rerank" else "embed",
                                [len(ids) for ids in job.encodings], total_s, outcome.tokenization_s, queue_s,
                                job.compute_s)
        total_ms = total_s * 1000
        headers = {"x-compute-type": "+".join(sorted({str(m.device) for m in item.batcher.models})),
                   "x-compute-time": f"{total_ms:.3f}", "x-total-time": f"{total_ms:.3f}",
                   "x-compute-characters": str(outcome.characters), "x-compute-tokens": str(outcome.tokens),
                   "x-tokenization-time": f"{outcome.tokenization_s * 1000:.3f}",
                   "x-queue-time": f"{queue_s * 1000:.3f}", "x-inference-time": f"{job.compute_s * 1000:.3f}"}
        return json_response(content, headers=headers)

    def route(path: str, handler: Callable[..., Any], scope: Scope) -> None:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            call = Call()
            try:
                response = await handler(scope, call, request, protocol.parse_object(await request.body()), started)
            except ApiError as exc:
                if call.model is not None:
                    metrics.count("te_request_count", call.model, call.method)
                    metrics.count("te_request_failure", call.model, exc.err)
                return error_response(path, exc)
            if call.model is not None:
                metrics.count("te_request_count", call.model, call.method)
                metrics.count("te_request_success", call.model, call.method)
            return response

        app.add_api_route(path, endpoint, methods=["POST"], name=path)

    def by_body(scope: Scope, call: Call, body: dict[str, Any], route: str, kind: str) -> Served:
        """OpenAI's and Cohere's routes: the model the body names (under a prefix, that prefix's model)."""
        if scope.prefix:
            return scope.pick(call, route, kind)
        name = protocol.optional(body, "model", str)
        fitting = [item for item in served if item.kind == kind]
        listed = ", ".join(item.name for item in fitting) or "none"
        if name is None:
            if len(fitting) == 1:
                call.model = fitting[0].name
                return fitting[0]
            if not fitting:
                return scope.pick(call, route, kind)
            raise ApiError(422, f"this server serves several {kind} models: name one in the body's model field "
                                f"({listed})", "model")
        item = next((item for item in fitting if item.name == name), None)
        if item is None:
            other = next((x for x in served if x.name == name), None)
            why = f"{protocol.shown(name)} is {KIND_NAMES[other.kind]}" if other else \
                f"no model {protocol.shown(name)} is served here"
            raise ApiError(404, f"{why}; {route} serves {KIND_NAMES[kind].split(' ', 1)[1]}s: {listed}", "model",
                           kind="not_found", err="model_type" if other else "validation")
        call.model = item.name
        return item

    # --- text-embeddings-inference ------------------------------------------------------------------------------

    async def tei_embed(scope: Scope, call: Call, request: Request, body: dict[str, Any], started: float) -> Response:
        item = scope.pick(call, "/embed", "embed")
        size = protocol.dimensions(body, dimensions[item.name])
        outcome = await embed(item, call, request, body, "inputs", started)
        return answer(vectors(outcome, protocol.flag(body, "normalize", True), size).tolist(), outcome, started)

    async def tei_embed_all(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                            started: float) -> Response:
        item = scope.pick(call, "/embed_all", "embed")
        outcome = await embed(item, call, request, body, "inputs", started, output="tokens")
        return answer([np.asarray(rows, dtype=np.float32).tolist() for rows in outcome.results], outcome, started)

    async def tei_embed_sparse(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                               started: float) -> Response:
        item = scope.pick(call, "/embed_sparse", "sparse")
        outcome = await embed(item, call, request, body, "inputs", started, output="sparse")
        return answer([[{"index": int(index), "value": float(value)} for index, value in zip(*row)]
                       for row in outcome.results], outcome, started)

    async def tei_rerank(scope: Scope, call: Call, request: Request, body: dict[str, Any], started: float) -> Response:
        item = scope.pick(call, "/rerank", "rerank")
        call.method = "batch"
        texts = protocol.text_list(body.get("texts"), "texts", settings.max_client_batch_size)
        outcome = await score(item, request, body.get("query"), texts, "texts", body, started)
        raw = np.asarray(outcome.results, dtype=np.float64).reshape(len(texts), -1)[:, 0]
        scores = raw if protocol.flag(body, "raw_scores", False) else _sigmoid(raw)
        return_text = protocol.flag(body, "return_text", False)
        ranks = [{"index": int(index), "score": float(scores[index]), **({"text": texts[index]} if return_text else {})}
                 for index in np.argsort(-scores, kind="stable")]
        return answer(ranks, outcome, started)

    async def tei_predict(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                          started: float) -> Response:
        item = scope.pick(call, "/predict", "rerank")
        single, pairs = _predict_pairs(body.get("inputs"), settings.max_client_batch_size)
        call.method = "single" if single else "batch"
        truncate = protocol.flag(body, "truncate", settings.auto_truncate)
        left = protocol.left_truncation(body)
        admitted, took = await tokenise(item, item.tokens.pairs, pairs, _limit(item, None), truncate, left, "inputs")
        outcome = await run(item, request, admitted, ("pairs",), took, sum(len(a) + len(b) for a, b in pairs),
                            started)
        raw = np.asarray(outcome.results, dtype=np.float64).reshape(len(pairs), -1)
        scores = raw if protocol.flag(body, "raw_scores", False) else _activate(raw)
        names = labels[item.name]
        predictions = [sorted(({"score": float(value), "label": names[index]} for index, value in enumerate(row)),
                              key=lambda entry: -entry["score"]) for row in scores]
        return answer(predictions[0] if single else predictions, outcome, started)

    async def tei_similarity(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                             started: float) -> Response:
        item = scope.pick(call, "/similarity", "embed")
        inputs = body.get("inputs")
        if not isinstance(inputs, dict) or "source_sentence" not in inputs or "sentences" not in inputs:
            raise ApiError(422, "inputs must be an object with source_sentence and sentences", "inputs")
        source = protocol.check_text(inputs["source_sentence"], "inputs.source_sentence")
        sentences = protocol.text_list(inputs["sentences"], "inputs.sentences", settings.max_client_batch_size - 1)
        parameters = protocol.optional(body, "parameters", dict, {})
        outcome = await embed(item, call, request, {**parameters, "inputs": [source, *sentences]}, "inputs", started)
        rows = vectors(outcome, True, None)
        return answer((rows[1:] @ rows[0]).astype(float).tolist(), outcome, started)

    async def tei_tokenize(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                           started: float) -> Response:
        item = scope.models[0]
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

    async def tei_decode(scope: Scope, call: Call, request: Request, body: dict[str, Any], started: float) -> Response:
        item = scope.models[0]
        ids = body.get("ids")
        sequences = [ids] if isinstance(ids, list) and ids and all(map(protocol.is_token_id, ids)) else ids
        if not isinstance(sequences, list) or not sequences or not all(
                isinstance(seq, list) and seq and all(map(protocol.is_token_id, seq)) for seq in sequences):
            raise ApiError(422, "ids must be a non-empty list of token ids (integers) or a list of such lists", "ids")
        if len(sequences) > settings.max_client_batch_size:
            raise ApiError(413, f"ids has {len(sequences)} sequences, more than --max-client-batch-size "
                                f"{settings.max_client_batch_size}; split the request", "ids", err="batch_size")
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

    async def tei_root(scope: Scope, call: Call, request: Request, body: dict[str, Any], started: float) -> Response:
        """TEI's ``POST /``, which huggingface_hub's InferenceClient calls: by the body and the model served."""
        if "query" in body and "texts" in body:
            return await tei_rerank(scope, call, request, body, started)
        if isinstance(body.get("inputs"), dict):
            return await tei_similarity(scope, call, request, body, started)
        first = scope.find("embed", "sparse") or scope.models[0]
        handler = {"embed": tei_embed, "sparse": tei_embed_sparse, "rerank": tei_predict}[first.kind]
        return await handler(scope, call, request, body, started)

    # --- OpenAI and Cohere/Jina ---------------------------------------------------------------------------------

    async def openai_embeddings(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                                started: float) -> Response:
        item = by_body(scope, call, body, request.url.path, "embed")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {protocol.shown(encoding)}",
                           "encoding_format")
        size = protocol.dimensions(body, dimensions[item.name])
        outcome = await embed(item, call, request, body, "input", started, truncate=settings.auto_truncate)
        rows = vectors(outcome, True, size)
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                 if encoding == "base64" else row.tolist()} for index, row in enumerate(rows)]
        return answer({"object": "list", "data": data, "model": item.name,
                       "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens}}, outcome, started)

    async def cohere_rerank(scope: Scope, call: Call, request: Request, body: dict[str, Any],
                            started: float) -> Response:
        item = by_body(scope, call, body, request.url.path, "rerank")
        call.method = "batch"
        documents = body.get("documents")
        if isinstance(documents, list):  # Cohere's v1 also takes {"text": ...} objects
            documents = [entry["text"] if isinstance(entry, dict) and "text" in entry else entry for entry in documents]
        texts = protocol.text_list(documents, "documents", settings.max_client_batch_size)
        top_n = protocol.optional(body, "top_n", int, len(texts))
        if top_n < 1:
            raise ApiError(422, f"top_n must be at least 1, got {top_n}", "top_n")
        outcome = await score(item, request, body.get("query"), texts, "documents", body, started)
        scores = _sigmoid(np.asarray(outcome.results, dtype=np.float64).reshape(len(texts), -1)[:, 0])
        with_documents = protocol.flag(body, "return_documents", False)
        results = [{"index": int(index), "relevance_score": float(scores[index]),
                    **({"document": {"text": texts[index]}} if with_documents else {})}
                   for index in np.argsort(-scores, kind="stable")[:top_n]]
        return answer({"id": str(uuid.uuid4()), "results": results, "model": item.name,
                       "usage": {"total_tokens": outcome.tokens},
                       "meta": {"billed_units": {"search_units": 1}}}, outcome, started)

    tei_handlers = {"/embed": tei_embed, "/embed_all": tei_embed_all, "/embed_sparse": tei_embed_sparse,
                    "/predict": tei_predict, "/rerank": tei_rerank, "/similarity": tei_similarity,
                    "/tokenize": tei_tokenize, "/decode": tei_decode, "/embeddings": openai_embeddings}
    for path, handler in {"/": tei_root, **tei_handlers, "/v1/embeddings": openai_embeddings,
                          "/v1/rerank": cohere_rerank, "/v2/rerank": cohere_rerank}.items():
        route(path, handler, everything)
    scopes = {item.name: Scope([item], f"/models/{item.name}") for item in served if item.routed}
    for scope in scopes.values():
        for path, handler in {"": tei_root, "/": tei_root, **tei_handlers}.items():
            route(scope.prefix + path, handler, scope)

    # --- probes and descriptions --------------------------------------------------------------------------------

    def health(scope: Scope) -> Callable[[], Any]:
        async def probe() -> Response:
            if all(item.batcher.ready for item in scope.models):
                return json_response({"status": "ok"})
            failed = [f"{item.name} failed its warm-up ({type(item.batcher.failure).__name__}: "
                      f"{item.batcher.failure})" for item in scope.models if item.batcher.failure is not None]
            cold = ", ".join(item.name for item in scope.models if not item.batcher.ready)
            message = "; ".join(failed) if failed else f"warming up (compiling the static shapes): {cold}"
            return error_response("/health", ApiError(503, message, kind="unhealthy"))
        return probe

    def info(scope: Scope) -> Callable[[], Any]:
        async def describe() -> Response:
            main = scope.find("embed") or scope.models[0]
            description = _describe(main, settings, dimensions.get(main.name), labels.get(main.name, []))
            reranker = scope.find("rerank")
            if reranker is not None and reranker is not main:
                description["reranker"] = _describe(reranker, settings, None, labels[reranker.name])
            return json_response(description)
        return describe

    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    for scope in (everything, *scopes.values()):
        for path in ("/health", "/ping"):
            app.add_api_route(scope.prefix + path, health(scope), methods=["GET"])
        app.add_api_route(scope.prefix + "/info", info(scope), methods=["GET"])
        app.add_api_route(scope.prefix + "/metrics", prometheus, methods=["GET"])

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [
            {"id": item.name, "object": "model", "created": 0, "owned_by": "st-npu", "type": item.kind}
            for item in served]})

    routes = set(POST_ROUTES) | set(GET_ROUTES)
    for scope in scopes.values():
        routes |= {scope.prefix + path for path in ("", "/", *TEI_POST_ROUTES, *TEI_GET_ROUTES)}
    return Gate(app, routes, settings.payload_limit, settings.api_key, metrics)


def _describe(item: Served, settings: Settings, dimension: int | None, labels: list[str]) -> dict[str, Any]:
    """TEI's ``/info`` fields, and st_npu's own (devices, static shapes) after them."""
    model, batcher = item.model, item.batcher
    kind = {"embedding": {"pooling": _pooling(model)}} if batcher.kind == "embed" else {
        "embedding": {"pooling": "splade"}} if batcher.kind == "sparse" else {  # TEI's model_type for SPLADE
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
