"""``st-npu serve``: embedders, rerankers and sparse encoders, any number in one process, behind
text-embeddings-inference's, OpenAI's and Cohere's APIs, batching concurrent requests per model.

The models come from ``--model name=path[,devices=...][,dtype=...]`` (once per model), a ``--deployment`` TOML file,
or the one-model options (``--model PATH`` with ``--devices``/``--served-model-name``, and ``--reranker PATH``);
:func:`model_entries` turns them into :class:`~st_npu.serve.deployment.ModelEntry` items. The options are built by
:func:`add_server_arguments`, which ``bench-serve`` reuses for the servers it starts.
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
from st_npu.commands.options import check_device, positive_int
from st_npu.loading.folder import DEFAULT_MODEL
from st_npu.serve.deployment import NAME, ModelEntry, check_names, detect_kind, is_named, parse_model_option, \
    read_deployment

HELP = "an embedding, reranking and sparse-embedding server (TEI, OpenAI and Cohere APIs) that batches requests"
MODEL_HELP = ("a model to serve, given once per model as name=path[,devices=npu:0,npu:1][,dtype=...][,spec=...]"
              "[,max_batch_tokens=N][,max_batch_size=N]: an embedder, a reranker (CrossEncoder) or a sparse encoder "
              "(SPLADE), told apart by its folder; its TEI routes are /models/NAME/... and OpenAI/Cohere clients "
              "name it in 'model'. A bare folder or hub id (once) is the one-model form, named by "
              f"--served-model-name (default {DEFAULT_MODEL} when no model is given)")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batching options of a server, shared with ``bench-serve`` (which starts servers)."""
    parser.add_argument("--model", action="append", help=MODEL_HELP)
    parser.add_argument("--deployment", help="a TOML file with one [[models]] table per model (name, path and the "
                                             "--model options as keys), served with any --model given")
    parser.add_argument("--spec", default=None,
                        help="known model the folder holds, when its name does not say (e.g. BAAI/llm-embedder)")
    parser.add_argument("--device", default=None,
                        help="auto (default), npu, npu:N, cpu, cuda:N: every model's unless it names its devices")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16, unless a model says")
    parser.add_argument("--devices", help="the one-model form's devices, one copy each, e.g. npu:0,npu:1")
    parser.add_argument("--reranker", help="a CrossEncoder (reranker) folder or hub id to serve too, or alone")
    parser.add_argument("--reranker-devices", help="the reranker's devices, e.g. npu:2 (default: --device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                        help="padded tokens (rows x bucket length) per batch, per model unless it says (default 16384)")
    parser.add_argument("--max-batch-size", type=positive_int, default=64,
                        help="texts per batch, per model unless it says (default 64)")
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
    parser.add_argument("--served-model-name", help="the one-model form's name, which /info and /v1/models give and "
                                                    "OpenAI/Cohere clients send as 'model' (default: --model as given)")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--request-timeout", type=_deadline, default=None,
                        help="seconds a request may wait for a device; past it, a request none of whose texts reached "
                             "a device is dropped and answered 504 (default: none). A request's own "
                             "'x-request-timeout: SECONDS' header overrides it")
    parser.add_argument("--api-key", help="refuse requests without 'Authorization: Bearer <key>' (401)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="no batching: one encode per request, one request at a time per device (a baseline)")
    parser.add_argument("--graceful-timeout", type=_seconds, default=30.0,
                        help="on SIGTERM or Ctrl-C, seconds to go on answering the requests in flight and queued; then "
                             "whatever is still queued is answered 503 and the process exits after at most the one "
                             "batch each device is computing (default 30)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value


def _deadline(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds (leave it out for no deadline)")
    return value


def device_list(args: argparse.Namespace, option: str = "devices") -> list[str | None]:
    """``--devices npu:0,npu:1`` (one model each), else ``--device`` (one model)."""
    given = getattr(args, option.replace("-", "_"), None)
    if not given:
        return [args.device]
    devices = [item.strip() for item in given.split(",")]
    if (option == "devices" and args.device) or not all(devices) or len(set(devices)) != len(devices):
        raise UsageError(f"--{option} takes distinct devices separated by commas (and no --device), got {given!r}")
    return devices


def model_entries(args: argparse.Namespace) -> list[ModelEntry]:
    """Every model the options name, in order (the one-model form first, then --model name=..., the deployment file,
    and --reranker), each with its kind read from its folder."""
    given = args.model or []
    bare = [text for text in given if not is_named(text)]
    if len(bare) > 1:
        raise UsageError(f"--model is given {len(bare)} times without a name: write each as name=path "
                         f"(e.g. --model small={bare[0]})")
    if args.devices and not bare and given:
        raise UsageError("--devices goes with the one-model form (--model PATH); with name=path, write "
                         "--model name=path,devices=npu:0,npu:1")
    if args.served_model_name and not bare and given:
        raise UsageError("--served-model-name names the one-model form (--model PATH); name=path names itself")
    default = (args.device,)
    entries = []
    if bare or not (given or args.deployment or args.reranker):
        path = bare[0] if bare else DEFAULT_MODEL
        name = args.served_model_name or path
        entries.append(ModelEntry(name, path, None, tuple(device_list(args)), args.dtype, args.spec,
                                  routed=NAME.fullmatch(name) is not None))
    for text in given:
        if is_named(text):
            entries.append(_with_defaults(parse_model_option(text), default, args))
    if args.deployment:
        entries += [_with_defaults(entry, default, args) for entry in read_deployment(args.deployment)]
    if args.reranker:
        entries.append(ModelEntry(args.reranker, args.reranker, "rerank", tuple(device_list(args, "reranker-devices")),
                                  args.dtype, routed=NAME.fullmatch(args.reranker) is not None))
    check_names(entries)
    return [detect_kind(entry) for entry in entries]


def _with_defaults(entry: ModelEntry, devices: tuple[str | None, ...], args: argparse.Namespace) -> ModelEntry:
    from dataclasses import replace

    return replace(entry, devices=entry.devices if entry.devices != (None,) else devices,
                   dtype=entry.dtype or args.dtype)


def load(entry: ModelEntry, device: str | None) -> Any:
    """One copy of a served model on one device: ``st_npu.SentenceTransformer`` or ``st_npu.CrossEncoder``, or a
    stock ``SparseEncoder`` built under ``st_npu.patch()`` (which puts it on the engine as the others are)."""
    check_device(device)
    if entry.kind == "rerank":
        from st_npu.cross_encoder import CrossEncoder

        return CrossEncoder(entry.path, device=device, dtype=entry.dtype)
    if entry.kind == "sparse":
        import sentence_transformers

        import st_npu

        with st_npu.patch(dtype=entry.dtype):
            return sentence_transformers.SparseEncoder(entry.path, device=device)
    return load_embedder(entry, device)


def load_embedder(entry: ModelEntry, device: str | None) -> Any:
    """The embedder for one device, without a final Normalize module: the server normalises per request
    (TEI's ``normalize``, default true), so ``normalize: false`` and ``dimensions`` get the pooled vector."""
    from st_npu import SentenceTransformer

    model = SentenceTransformer(entry.path, device=device, dtype=entry.dtype, spec=entry.spec)
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

    require_serve_stack()
    entries = model_entries(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one text per call: threads belong to the workers
    import uvicorn

    from st_npu.serve.app import Served, Settings, create_app
    from st_npu.serve.batcher import Batcher, max_length
    from st_npu.serve.metrics import Metrics
    from st_npu.serve.tokens import Tokenization

    loaded = [[load(entry, device) for device in entry.devices] for entry in entries]
    every = [model for models in loaded for model in models]
    workers = size_threads(sum(m.device.type == "cpu" for m in every), args.tokenization_workers)
    metrics = Metrics([model.device for model in every], max(max_length(model) for model in every))
    settings = Settings(args.max_client_batch_size, args.auto_truncate, args.payload_limit, args.api_key, workers,
                        args.graceful_timeout, args.request_timeout)
    served = []
    for entry, models in zip(entries, loaded):
        batcher = Batcher(models, entry.max_batch_tokens or args.max_batch_tokens,
                          entry.max_batch_size or args.max_batch_size, args.max_concurrent_requests,
                          max_batch_requests=1 if args.one_at_a_time else None, metrics=metrics, kind=entry.kind,
                          name=entry.name)
        served.append(Served(batcher, entry.name, Tokenization(models[0].tokenizer, workers), entry.routed))
    app = create_app(served, metrics, settings)
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
