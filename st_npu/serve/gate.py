"""The ASGI layer in front of the routes: the API key, the payload limit, unknown routes, request metrics.

The body is read here, up to ``--payload-limit`` bytes: a larger one (by its Content-Length, or as it streams in)
is answered 413 without being parsed. It is still read to its end (and dropped) up to ``DISCARD_LIMIT``: a client
such as Python's urllib sends the whole body before it reads any answer, and a server that answers and closes
while it is still sending leaves it with a broken pipe instead of the 413. The routes then read the body from memory, and whatever the client
sends after it (its disconnection) still reaches them, so a request whose client has gone can be dropped.
"""

from __future__ import annotations

from typing import Any

from st_npu.serve.protocol import ApiError, error_response

OPEN_ROUTES = ("/health", "/ping")  # probes need no key
DISCARD_LIMIT = 64 * 2 ** 20  # bytes of a too-large body read and dropped before answering (or the limit's 4x)


class Gate:
    def __init__(self, app: Any, routes: set[str], payload_limit: int, api_key: str | None, metrics: Any) -> None:
        self.app, self.routes, self.payload_limit, self.api_key, self.metrics = (
            app, routes, payload_limit, api_key, metrics)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in self.routes else "other"  # bounded label values
        status: list[int] = []

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None and scope["method"] == "POST":
                body, refusal = await self._read_body(scope, receive)
                receive = _replay(body, receive)
            if refusal is not None:
                await error_response(path, refusal)(scope, receive, record)
            else:
                await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(label).inc()
            if status and status[0] >= 400:
                self.metrics.errors.labels(label, str(status[0])).inc()

    def _refusal(self, scope: dict) -> ApiError | None:
        if not self.api_key or scope["path"] in OPEN_ROUTES or scope["path"].endswith(OPEN_ROUTES):
            return None
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
            return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="unauthorized")
        return None

    async def _read_body(self, scope: dict, receive: Any) -> tuple[bytes, ApiError | None]:
        too_large = ApiError(413, f"the request body is larger than --payload-limit ({self.payload_limit} bytes)",
                             kind="validation")
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else 0
        discard = max(DISCARD_LIMIT, 4 * self.payload_limit)
        if declared > discard:  # too much to read only to drop it: answer now (the client may not see it)
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.payload_limit and declared <= self.payload_limit:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > discard:
                break
        if size > self.payload_limit or declared > self.payload_limit:
            return b"", too_large
        return b"".join(chunks), None


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
