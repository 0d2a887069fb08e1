"""The HTTP routes: OpenAI's ``POST /v1/embeddings``, TEI's ``POST /embed``, ``/health``, ``/info``, ``/metrics``.

Request bodies are checked here, by hand rather than by a schema, so each refusal can name the field and the index
and take the error shape its clients expect: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on
``/v1/...``, TEI's ``{"error", "error_type"}`` elsewhere. Texts are tokenised (for their lengths) in a thread of
the pool, then queued on the :class:`~st_npu.serve.batcher.Batcher`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from st_npu import __version__
from st_npu.serve.batcher import Batcher, Job, QueueFull
from st_npu.engine.tokenizer_lock import tokenizer_lock


ROUTES = ("/v1/embeddings", "/embed", "/health", "/info", "/metrics")


@dataclass(frozen=True)
class Limits:
    max_client_batch_size: int
    api_key: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "Validation") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def create_app(batcher: Batcher, metrics: Any, limits: Limits, model_name: str) -> FastAPI:
    model = batcher.models[0]
    from st_npu import _compat

    dimension = _compat.embedding_dimension(model)
    count_tokens = TokenCounter(model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()  # warm-up runs in the device workers; /health says 503 until it is done
        yield
        await run_in_threadpool(batcher.close)  # uvicorn has answered every request by now; finish the queue

    app = FastAPI(title="st-npu serve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        route = request.url.path if request.url.path in ROUTES else "other"  # bounded label values
        if limits.api_key and route != "/health" \
                and request.headers.get("authorization") != f"Bearer {limits.api_key}":
            refusal = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="Unauthorized")
            response = _error(request.url.path, refusal)
        else:
            response = await call_next(request)
        metrics.requests.labels(route).inc()
        if response.status_code >= 400:
            metrics.errors.labels(route, str(response.status_code)).inc()
        return response

    async def embed(texts_field: str, prompt_name: str | None, normalize: bool,
                    truncate: bool, raw_inputs: Any) -> tuple[np.ndarray, int]:
        texts = _texts(raw_inputs, texts_field, limits.max_client_batch_size)
        if prompt_name is not None and prompt_name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise ApiError(422, f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}", "prompt_name")
        lengths = await run_in_threadpool(count_tokens, texts, prompt_name)
        limit = batcher.max_seq_length
        if not truncate:
            for index, length in enumerate(lengths):
                if length > limit:
                    raise ApiError(413, f"{texts_field}[{index}] has {length} tokens, more than the model's maximum "
                                        f"input length {limit}; shorten it or send truncate: true", texts_field)
        lengths = [min(length, limit) for length in lengths]
        job = Job(texts, prompt_name, normalize, max(lengths))
        try:
            future = batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}; retry later", kind="Overloaded") from None
        metrics.in_progress.inc()
        try:
            vectors = await asyncio.wrap_future(future)
        except Exception as exc:
            raise ApiError(500, f"embedding failed: {type(exc).__name__}: {exc}", kind="Backend") from exc
        finally:
            metrics.in_progress.dec()
        tokens = sum(lengths)
        metrics.tokens.inc(tokens)
        return vectors, tokens

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        route = "/v1/embeddings"
        try:
            body = await _json_object(request)
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
            wanted = body.get("dimensions")
            if wanted is not None and wanted != dimension:
                raise ApiError(400, f"dimensions={wanted!r} cannot be given: this model's embeddings have {dimension} "
                                    f"dimensions and it was not trained to shorten them", "dimensions")
            if "input" not in body:
                raise ApiError(422, "missing field 'input' (a string or a list of strings)", "input")
            vectors, tokens = await embed("input", _optional_str(body, "prompt_name"), False, False,
                                          body["input"])
        except ApiError as exc:
            return _error(route, exc)
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                 if encoding == "base64" else vector.tolist()}
                for index, vector in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body.get("model") or model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/embed")
    async def tei_embed(request: Request) -> Response:
        route = "/embed"
        try:
            body = await _json_object(request)
            if "inputs" not in body:
                raise ApiError(422, "missing field 'inputs' (a string or a list of strings)", "inputs")
            vectors, _ = await embed("inputs", _optional_str(body, "prompt_name"),
                                     _bool(body, "normalize", True), _bool(body, "truncate", False), body["inputs"])
        except ApiError as exc:
            return _error(route, exc)
        return JSONResponse(vectors.tolist())

    @app.get("/health")
    async def health() -> Response:
        if batcher.ready:
            return JSONResponse({"status": "ok"})
        return _error("/health", ApiError(503, "warming up: compiling the static shapes", kind="Unhealthy"))

    @app.get("/info")
    async def info() -> Response:
        return JSONResponse({
            "model_id": model_name,
            "version": __version__,
            "devices": [str(m.device) for m in batcher.models],
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "embedding_dimension": dimension,
            "max_input_length": batcher.max_seq_length,
            "prompts": sorted(model.prompts),
            "static_shapes": batcher.static_shapes,
            "batching": batcher.max_batch_requests != 1,
            "max_batch_tokens": batcher.max_batch_tokens,
            "max_batch_size": batcher.max_batch_size,
            "max_client_batch_size": limits.max_client_batch_size,
            "max_concurrent_requests": batcher.max_concurrent_requests,
            "ready": batcher.ready,
        })

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _texts(value: Any, field: str, max_client_batch_size: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(422, f"{field} must be a string or a list of strings, got {type(value).__name__}", field)
    if not value:
        raise ApiError(422, f"{field} is an empty list: send at least one text", field)
    if len(value) > max_client_batch_size:
        raise ApiError(413, f"{field} has {len(value)} texts, more than --max-client-batch-size "
                            f"{max_client_batch_size}; split the request", field)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(422, f"{field}[{index}] is {type(item).__name__} ({item!r:.40}), expected a string "
                                f"(token arrays are not accepted)", field)
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"{key} must be a string, got {type(value).__name__}", key)
    return value


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(422, f"{key} must be true or false, got {value!r:.40}", key)
    return value


class TokenCounter:
    """Tokens per text as ``encode`` will see it: prompt prepended, special tokens included, not truncated.

    It uses a copy of the model's tokenizer, behind that copy's lock (:mod:`st_npu.engine.tokenizer_lock`), so counting
    never waits for the device worker's ``encode``, which keeps using the original.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokenizer = copy.deepcopy(model.tokenizer)

    def __call__(self, texts: list[str], prompt_name: str | None) -> list[int]:
        prompt = self.model.prompts.get(prompt_name or self.model.default_prompt_name or "", "")
        with tokenizer_lock(self.tokenizer):
            encoded = self.tokenizer([prompt + text for text in texts], add_special_tokens=True, truncation=False,
                                     return_attention_mask=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]


def _error(route: str, error: ApiError) -> JSONResponse:
    if route.startswith("/v1/"):
        kind = "invalid_request_error" if error.status < 500 and error.status not in (401, 429) else error.kind.lower()
        content = {"error": {"message": error.message, "type": kind, "param": error.param,
                             "code": str(error.status)}}
    else:
        content = {"error": error.message, "error_type": error.kind}
    return JSONResponse(content, status_code=error.status)
