"""``st-npu serve``: an embedding server with OpenAI's and text-embeddings-inference's APIs.

Concurrent requests are gathered into batches of static shapes (:mod:`st_npu.serve.batcher`), one model per
device. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, httpx), imported only here, on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
from typing import Any

from st_npu.errors import UsageError

SERVE_HINT = 'pip install "st-npu[serve]"'
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "httpx")


def require_serve_stack() -> None:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the server needs {', '.join(missing)}: {SERVE_HINT}")


def device_list(args: argparse.Namespace) -> list[str | None]:
    """``--devices npu:0,npu:1`` (one model each), else ``--device`` (one model)."""
    if not getattr(args, "devices", None):
        return [args.device]
    devices = [item.strip() for item in args.devices.split(",")]
    if args.device or not all(devices) or len(set(devices)) != len(devices):
        raise UsageError(f"--devices takes distinct devices separated by commas (and no --device), "
                         f"got {args.devices!r}")
    return devices


def run_serve(args: argparse.Namespace) -> int:
    """Load one model per device, serve until SIGTERM or Ctrl-C, finish the requests in flight, return 0."""
    devices = device_list(args)
    require_serve_stack()
    import uvicorn

    from st_npu.options import load_model
    from st_npu.serve.app import Limits, create_app
    from st_npu.serve.batcher import Batcher
    from st_npu.serve.metrics import Metrics

    models = [load_model(args, device=device) for device in devices]
    metrics = Metrics([model.device for model in models])
    batcher = Batcher(models, args.max_batch_tokens, args.max_batch_size, args.max_concurrent_requests,
                      max_batch_requests=1 if args.one_at_a_time else None, metrics=metrics)
    app = create_app(batcher, metrics, Limits(args.max_client_batch_size, args.api_key), args.model)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None)
    with _signals_end_quietly():
        uvicorn.Server(config).run()
    return 0


class _signals_end_quietly:
    """uvicorn handles SIGTERM/SIGINT (stop accepting, finish requests, shut down) and then raises the signal
    again to the handlers that were there before it; these no-op handlers let the process then exit 0."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> None:
        self.previous = {sig: signal.signal(sig, self._ignore) for sig in self.SIGNALS}

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def _ignore(signum: int, frame: Any) -> None:
        pass


def run_bench_serve(args: argparse.Namespace) -> int:
    require_serve_stack()
    from st_npu.serve.bench import run_bench_serve as run

    return run(args)
