"""The embedding server behind ``st-npu serve``: OpenAI's and text-embeddings-inference's APIs.

Concurrent requests are gathered into batches of static shapes (:mod:`st_npu.serve.batcher`), one model per
device. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, httpx), imported only on first use.
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
