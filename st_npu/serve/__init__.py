"""The server behind ``st-npu serve``: embedders, rerankers and sparse encoders, any number in one process
(:mod:`~st_npu.serve.deployment`), behind text-embeddings-inference's, OpenAI's and Cohere's (Jina's) APIs.

Requests are routed to their model and checked (:mod:`~st_npu.serve.app`, :mod:`~st_npu.serve.protocol`),
tokenised once at admission (:mod:`~st_npu.serve.tokens`) and gathered into batches of static shapes
(:mod:`~st_npu.serve.batcher`), one batcher per model and one model copy per device, behind an ASGI gate for the
payload limit and the API key (:mod:`~st_npu.serve.gate`); metrics in st_npu's and TEI's names
(:mod:`~st_npu.serve.metrics`). Needs the ``serve`` extra (FastAPI,
uvicorn, prometheus-client, httpx), imported only on first use.
"""

from __future__ import annotations

import importlib.util

from st_npu.errors import UsageError

SERVE_HINT = 'pip install "st-npu[serve]"'
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "httpx")


def require_serve_stack() -> None:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the server needs {', '.join(missing)}: {SERVE_HINT}")
