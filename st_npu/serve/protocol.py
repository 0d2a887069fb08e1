"""Request fields and error answers, in the shapes the clients of each API expect.

Bodies are checked by hand rather than by a schema, so each refusal names the field and the index. Errors take
text-embeddings-inference's shape, ``{"error", "error_type"}``, except under ``/v1/`` and ``/v2/`` (OpenAI's and
Cohere's clients), where they take OpenAI's, ``{"error": {"message", "type", "param", "code"}}``. Answers are
written with ASCII escapes, so a lone surrogate a client sent can be echoed without breaking the JSON.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

MAX_SHOWN = 40  # characters of a bad value quoted in an error


class ApiError(Exception):
    """A refusal: HTTP ``status``, a message naming the problem, the field, TEI's ``error_type``, and the reason
    TEI's ``te_request_failure`` counts it under (``err``; by default read off the kind)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "validation",
                 err: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.err = err or FAILURE_OF_KIND.get(kind, "validation")


FAILURE_OF_KIND = {"tokenizer": "tokenization", "overloaded": "overloaded", "backend": "inference",
                   "cancelled": "dropped", "timeout": "deadline", "unhealthy": "inference"}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def error_response(path: str, error: ApiError) -> Response:
    if path.startswith(("/v1/", "/v2/")):
        kind = "invalid_request_error" if error.status in (400, 404, 405, 413, 422) else error.kind
        content: dict[str, Any] = {"error": {"message": error.message, "type": kind, "param": error.param,
                                             "code": str(error.status)}}
    else:
        content = {"error": error.message, "error_type": error.kind}
    return json_response(content, error.status)


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def shown(value: Any) -> str:
    return ascii(value)[:MAX_SHOWN]


def check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise ApiError(422, f"{where} is {type(text).__name__} ({shown(text)}), expected a string", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(422, f"{where} is not valid Unicode: a lone surrogate {shown(text[exc.start])} at "
                            f"character {exc.start}", where) from None
    return text


def texts_or_ids(value: Any, field: str, max_batch: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """TEI's and OpenAI's inputs: a text, a list of texts, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [check_text(value, field)], None
    if not isinstance(value, list):
        raise ApiError(422, f"{field} must be a string, a list of strings or token ids, got "
                            f"{type(value).__name__}", field)
    if not value:
        raise ApiError(422, f"{field} is an empty list: send at least one input", field)
    if all(is_token_id(item) for item in value):
        return None, [value]
    if len(value) > max_batch:
        raise ApiError(413, f"{field} has {len(value)} inputs, more than --max-client-batch-size {max_batch}; "
                            f"split the request", field, err="batch_size")
    if all(isinstance(item, list) for item in value):
        for index, ids in enumerate(value):
            if not ids or not all(is_token_id(item) for item in ids):
                raise ApiError(422, f"{field}[{index}] must be a non-empty list of token ids (integers)", field)
        return None, value
    return [check_text(item, f"{field}[{index}]") for index, item in enumerate(value)], None


def text_list(value: Any, field: str, max_batch: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ApiError(422, f"{field} must be a list of strings, got {type(value).__name__}", field)
    if not value:
        raise ApiError(422, f"{field} is an empty list: send at least one text", field)
    if len(value) > max_batch:
        raise ApiError(413, f"{field} has {len(value)} texts, more than --max-client-batch-size {max_batch}; "
                            f"split the request", field, err="batch_size")
    return [check_text(item, f"{field}[{index}]") for index, item in enumerate(value)]


def is_token_id(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ApiError(422, f"{key} must be {names}, got {type(value).__name__} ({shown(value)})", key)
    return value


def flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"{key} must be true or false, got {shown(value)}", key)
    return value


def left_truncation(body: dict[str, Any]) -> bool:
    """TEI's ``truncation_direction``: ``Right`` (default) or ``Left``, in any case."""
    value = optional(body, "truncation_direction", str, "right")
    if value.lower() not in ("left", "right"):
        raise ApiError(422, f"truncation_direction must be 'Left' or 'Right', got {shown(value)}",
                       "truncation_direction")
    return value.lower() == "left"


def dimensions(body: dict[str, Any], size: int) -> int | None:
    value = optional(body, "dimensions", int)
    if value is not None and not 0 < value <= size:
        raise ApiError(422, f"dimensions={value} is out of range: this model's embeddings have {size} dimensions; "
                            f"send 1 to {size}", "dimensions")
    return value
