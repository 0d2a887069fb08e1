"""``st-npu serve``: an embedding server (OpenAI and TEI APIs) that batches concurrent requests.

Its options are built by :func:`add_server_arguments`, which ``bench-serve`` reuses for the servers it starts.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from st_npu.errors import UsageError
from st_npu.commands.options import add_model_arguments, positive_int

HELP = "an embedding server (OpenAI and TEI APIs) that batches requests"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batching options of a server, shared with ``bench-serve`` (which starts servers)."""
    add_model_arguments(parser)
    parser.add_argument("--devices", help="one model per device, e.g. npu:0,npu:1 (instead of --device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                        help="padded tokens (rows x bucket length) per batch (default 16384)")
    parser.add_argument("--max-batch-size", type=positive_int, default=64, help="texts per batch (default 64)")
    parser.add_argument("--max-client-batch-size", type=positive_int, default=32,
                        help="texts per request; more is refused with 413 (default 32)")
    parser.add_argument("--max-concurrent-requests", type=positive_int, default=512,
                        help="requests queued or computing; more are refused with 429 (default 512)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--api-key", help="refuse requests without 'Authorization: Bearer <key>' (401)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="no batching: one encode per request, one request at a time per device (a baseline)")


def device_list(args: argparse.Namespace) -> list[str | None]:
    """``--devices npu:0,npu:1`` (one model each), else ``--device`` (one model)."""
    if not getattr(args, "devices", None):
        return [args.device]
    devices = [item.strip() for item in args.devices.split(",")]
    if args.device or not all(devices) or len(set(devices)) != len(devices):
        raise UsageError(f"--devices takes distinct devices separated by commas (and no --device), "
                         f"got {args.devices!r}")
    return devices


def run(args: argparse.Namespace) -> int:
    """Load one model per device, serve until SIGTERM or Ctrl-C, finish the requests in flight, return 0."""
    from st_npu.serve import require_serve_stack

    devices = device_list(args)
    require_serve_stack()
    import uvicorn

    from st_npu.commands.options import load_model
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
