"""``st-npu serve``: an embedder and/or a reranker behind text-embeddings-inference's, OpenAI's and Cohere's APIs,
batching concurrent requests.

Its options are built by :func:`add_server_arguments`, which ``bench-serve`` reuses for the servers it starts.
The reranker is built by :func:`load_reranker` alone.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from st_npu.errors import UsageError
from st_npu.loading.folder import DEFAULT_MODEL
from st_npu.options import add_model_arguments, positive_int

HELP = "an embedding and reranking server (TEI, OpenAI and Cohere APIs) that batches requests"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batching options of a server, shared with ``bench-serve`` (which starts servers)."""
    add_model_arguments(parser)
    parser.set_defaults(model=None)  # none given with --reranker: the reranker alone
    parser.add_argument("--devices", help="one model per device, e.g. npu:0,npu:1 (instead of --device)")
    parser.add_argument("--reranker", help="a CrossEncoder (reranker) folder or hub id to serve too, or alone")
    parser.add_argument("--reranker-devices", help="the reranker's devices, e.g. npu:2 (default: --device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                        help="padded tokens (rows x bucket length) per batch (default 16384)")
    parser.add_argument("--max-batch-size", type=positive_int, default=64, help="texts per batch (default 64)")
    parser.add_argument("--max-client-batch-size", type=positive_int, default=32,
                        help="texts per request; more is refused with 413 (default 32)")
    parser.add_argument("--max-concurrent-requests", type=positive_int, default=512,
                        help="requests queued or computing; more are refused with 429 (default 512)")
    parser.add_argument("--auto-truncate", action=argparse.BooleanOptionalAction, default=True,
                        help="cut texts over the model's limit when a request does not say truncate (default on)")
    parser.add_argument("--payload-limit", type=positive_int, default=2_000_000,
                        help="request bodies over this many bytes are refused with 413 (default 2000000)")
    parser.add_argument("--tokenization-workers", type=positive_int, default=None,
                        help="threads tokenising requests (default: half the cores this process owns, 1 to 4)")
    parser.add_argument("--served-model-name", help="the model name /info and /v1/models give (default --model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--api-key", help="refuse requests without 'Authorization: Bearer <key>' (401)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="no batching: one encode per request, one request at a time per device (a baseline)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to finish the requests in flight before exiting (default 30)")


def device_list(args: argparse.Namespace, option: str = "devices") -> list[str | None]:
    """``--devices npu:0,npu:1`` (one model each), else ``--device`` (one model)."""
    given = getattr(args, option.replace("-", "_"), None)
    if not given:
        return [args.device]
    devices = [item.strip() for item in given.split(",")]
    if (option == "devices" and args.device) or not all(devices) or len(set(devices)) != len(devices):
        raise UsageError(f"--{option} takes distinct devices separated by commas (and no --device), got {given!r}")
    return devices


def load_reranker(path: str, device: str | None, dtype: str | None) -> Any:
    """The reranker for one device: ``st_npu.CrossEncoder``, on the engine as the embedder is."""
    from st_npu.cross_encoder import CrossEncoder

    return CrossEncoder(path, device=device, dtype=dtype)


def load_embedder(args: argparse.Namespace, device: str | None) -> Any:
    """The embedder for one device, without a final Normalize module: the server normalises per request
    (TEI's ``normalize``, default true), so ``normalize: false`` and ``dimensions`` get the pooled vector."""
    from st_npu.options import load_model

    model = load_model(args, device=device)
    if len(model) > 1 and type(model[len(model) - 1]).__name__ == "Normalize":
        del model[len(model) - 1]
    return model


def owned_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup (v2) CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def size_threads(cpu_workers: int, tokenization_workers: int | None) -> int:
    """Torch threads shared by the CPU device workers within the owned cores (unless OMP_NUM_THREADS says);
    returns the tokenisation workers."""
    import torch

    cores = owned_cores()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cores // max(1, cpu_workers)))
    return tokenization_workers or max(1, min(4, cores // 2))


def run(args: argparse.Namespace) -> NoReturn:
    """Load the models (one per device), serve until SIGTERM or Ctrl-C, finish the requests in flight within
    --graceful-timeout, and exit the process with 0."""
    from st_npu.serve import require_serve_stack

    if args.model is None and not args.reranker:
        args.model = DEFAULT_MODEL
    devices = device_list(args) if args.model else []
    reranker_devices = device_list(args, "reranker-devices") if args.reranker else []
    require_serve_stack()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one text per call: threads belong to the workers
    import uvicorn

    from st_npu.serve.app import Served, Settings, create_app
    from st_npu.serve.batcher import Batcher
    from st_npu.serve.metrics import Metrics
    from st_npu.serve.tokens import Tokenization

    embedders = [load_embedder(args, device) for device in devices]
    rerankers = [load_reranker(args.reranker, device, args.dtype) for device in reranker_devices]
    every = embedders + rerankers
    workers = size_threads(sum(m.device.type == "cpu" for m in every), args.tokenization_workers)
    metrics = Metrics([model.device for model in every])
    settings = Settings(args.max_client_batch_size, args.auto_truncate, args.payload_limit, args.api_key, workers,
                        args.graceful_timeout)

    def served(models: list[Any], kind: str, name: str) -> Served | None:
        if not models:
            return None
        batcher = Batcher(models, args.max_batch_tokens, args.max_batch_size, args.max_concurrent_requests,
                          max_batch_requests=1 if args.one_at_a_time else None, metrics=metrics, kind=kind)
        return Served(batcher, name, Tokenization(models[0].tokenizer, workers))

    app = create_app(served(embedders, "embed", args.served_model_name or args.model),
                     served(rerankers, "rerank", args.reranker), metrics, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout)
    with _signals_end_quietly():
        uvicorn.Server(config).run()
    # Every request is answered and every device worker stopped by now; the interpreter's own teardown (torch,
    # the models, the tokenizer copies) took seconds more on a busy host, past --graceful-timeout, so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
