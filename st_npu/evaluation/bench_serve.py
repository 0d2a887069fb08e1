"""``st-npu bench-serve``: the batching server against a one-request-at-a-time server, same models and devices; or,
given several named models (``--model name=path`` twice or more, or ``--deployment``), each model served alone
against the same model sharing one server with the others under mixed load.

Both servers are ``st-npu serve`` subprocesses on 127.0.0.1 (the baseline with ``--one-at-a-time``: one device
call per request, one request at a time, the way a small web app around ``encode`` runs). For each workload
(``embed``: one short text per request to ``/v1/embeddings``; ``rerank``, with ``--reranker``: a query and
four short documents per request to ``/rerank``) and each client count, ``c`` clients send requests back to back
for ``--duration`` seconds or ``--max-requests`` requests, first to the baseline and then to the batching server.
Figures: requests per second, p50 and p99 latency (as the client sees it), errors, the texts tokenised per request
(at admission, and again inside the model's own API in the device call); on the emulated npu, the device launches
(kernels, transfers, graph replays) and compilations per request after warm-up, from the servers' ``/metrics``.

Mixed load (:func:`run_mixed`): one server with every model, and one server per model with that model alone, all
``st-npu serve`` subprocesses with the same options. For each client count ``c``: ``c`` clients on one model's
alone server, for each model in turn; then ``c`` clients per model at once on the shared server (an embedder's
requests to ``/v1/embeddings``, a reranker's to ``/v1/rerank``, a sparse model's to ``/models/{name}/embed_sparse``,
each naming its model). Figures per model: requests per second, p50 and p99 latency, alone and shared.

The clients run in this process, on the same CPU as the servers: on a small machine they take a share of it
from both servers alike, so compare the two servers' figures side by side, not with other machines'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from st_npu.errors import UsageError
from st_npu.evaluation.measure import percentile
from st_npu.files.outputs import atomic_file

START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 120
SERVERS = ("one-at-a-time", "batching")
SHORT_TEXTS = [f"{question} ({number})" for number in range(50) for question in (
    "how do I reset my password", "what is the capital of France", "best way to learn python",
    "opening hours of the city library", "symptoms of the flu", "北京今天的天气怎么样")]
DOCUMENTS = ["Paris is the capital and largest city of France.", "Reset a password from the sign-in page.",
             "The library opens at nine on weekdays.", "Influenza causes fever, cough and aches."]


def request_for(workload: str, index: int, model: str | None = None) -> tuple[str, dict[str, Any]]:
    """The route and body of a workload's ``index``-th request (to ``model`` by name, where given)."""
    text = SHORT_TEXTS[index % len(SHORT_TEXTS)]
    named = {"model": model} if model else {}
    if workload == "rerank":
        return ("/v1/rerank", {"query": text, "documents": DOCUMENTS, **named}) if model else (
            "/rerank", {"query": text, "texts": DOCUMENTS})
    if workload == "sparse":
        return (f"/models/{model}/embed_sparse" if model else "/embed_sparse"), {"inputs": text}
    return "/v1/embeddings", {"input": text, **named}


def run_bench_serve(args: argparse.Namespace, entries: list[Any] | None = None) -> int:
    """``entries``: the named models (:class:`~st_npu.serve.deployment.ModelEntry`) for a mixed-load run, else
    None (batching against one-at-a-time)."""
    if args.host not in ("127.0.0.1", "localhost"):
        raise UsageError(f"bench-serve runs against 127.0.0.1 only, got --host {args.host}")
    if entries:
        return run_mixed(args, entries)
    clients = _client_counts(args.clients)
    servers = {name: _Server(args, _model_options(args), one_at_a_time=name == "one-at-a-time") for name in SERVERS}
    results: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready()
        info = servers["batching"].get("/info")
        workloads = {}
        for workload, served in (("embed", info if "embedding" in info["model_type"] else None),
                                 ("rerank", info.get("reranker", info if "reranker" in info["model_type"] else None))):
            if served is not None:
                workloads[workload] = served["model_id"]
                print(f"{workload}: {served['model_id']} on {', '.join(served['devices'])} ({served['model_dtype']}),"
                      f" static shapes {'on' if served['static_shapes'] else 'off'}", flush=True)
        print(f"{args.duration:g} s or {args.max_requests} requests per run", flush=True)
        for workload, model in workloads.items():
            for count in clients:
                for name, server in servers.items():
                    result = {"workload": workload, "clients": count, "server": name,
                              **server.load(workload, model, count, args.duration, args.max_requests)}
                    results.append(result)
                    print(_row(result), flush=True)
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
    for workload in dict.fromkeys(result["workload"] for result in results):
        print(f"\n{workload}:")
        print(format_table([result for result in results if result["workload"] == workload]))
    if args.json_path:
        with atomic_file(Path(args.json_path)) as handle:
            handle.write(json.dumps({"servers": info, "results": results}, indent=2).encode())
    if any(codes.values()):
        raise RuntimeError(f"a server did not exit cleanly: {codes}")
    return 0


def run_mixed(args: argparse.Namespace, entries: list[Any]) -> int:
    """Each model alone on its own server, then every model at once on one server: per-model figures side by side."""
    clients = _client_counts(args.clients)
    together = _Server(args, [option for entry in entries for option in ("--model", entry.option())])
    alone = {entry.name: _Server(args, ["--model", entry.option()]) for entry in entries}
    kinds = {entry.name: entry.kind for entry in entries}
    results: list[dict[str, Any]] = []
    try:
        for server in (together, *alone.values()):
            server.wait_ready()
        for entry in entries:
            print(f"{entry.name}: {entry.kind} {entry.path} on {', '.join(map(str, entry.devices))}", flush=True)
        print(f"{args.duration:g} s or {args.max_requests} requests per model and run", flush=True)
        for count in clients:
            for name, server in alone.items():
                result = {"model": name, "kind": kinds[name], "clients": count, "server": "alone",
                          **server.load(kinds[name], name, count, args.duration, args.max_requests)}
                results.append(result)
                print(_mixed_row(result), flush=True)
            shared = together.load_mixed(kinds, count, args.duration, args.max_requests)
            for name, figures in shared.items():
                result = {"model": name, "kind": kinds[name], "clients": count, "server": "together", **figures}
                results.append(result)
                print(_mixed_row(result), flush=True)
    finally:
        codes = {name: server.stop() for name, server in (("together", together), *alone.items())}
    print()
    print(format_mixed_table(results))
    if args.json_path:
        with atomic_file(Path(args.json_path)) as handle:
            handle.write(json.dumps({"models": [entry.option() for entry in entries], "results": results},
                                    indent=2).encode())
    if any(codes.values()):
        raise RuntimeError(f"a server did not exit cleanly: {codes}")
    return 0


def _model_options(args: argparse.Namespace) -> list[str]:
    """The model options of ``bench-serve``'s command line, passed on to its servers as they are."""
    options = [option for value in args.model or [] for option in ("--model", value)]
    for option, value in (("--deployment", args.deployment), ("--spec", args.spec), ("--device", args.device),
                          ("--devices", args.devices), ("--dtype", args.dtype), ("--reranker", args.reranker),
                          ("--reranker-devices", args.reranker_devices),
                          ("--served-model-name", args.served_model_name)):
        if value:
            options += [option, value]
    return options


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UsageError(f"--clients takes positive integers separated by commas, got {text!r}")
    return counts


class _Server:
    """An ``st-npu serve`` subprocess with the benchmark's model options, on a free loopback port."""

    def __init__(self, args: argparse.Namespace, models: list[str], one_at_a_time: bool = False) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "st_npu", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning",
                   "--max-batch-tokens", str(args.max_batch_tokens), "--max-batch-size", str(args.max_batch_size),
                   "--max-concurrent-requests", str(args.max_concurrent_requests), *models]
        if one_at_a_time:
            command.append("--one-at-a-time")
        self.url = f"http://127.0.0.1:{self.port}"
        self.named = any("=" in value.split(",", 1)[0] for value in models)  # its requests name their model
        self.process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL)

    def get(self, route: str) -> Any:
        response = httpx.get(self.url + route, timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return response.json() if route != "/metrics" else response.text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} (its messages are above)")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s")

    def counts(self, model: str) -> dict[str, float]:
        """Texts tokenised by the model (at admission, in the device call) and, on the emulated npu,
        launches (kernels, transfers, graph replays) and compilations so far."""
        prefixes = {"admission": f'st_npu_tokenizations_total{{model="{model}",stage="admission"}}',
                    "device": f'st_npu_tokenizations_total{{model="{model}",stage="device"}}',
                    "launches": "st_npu_emulated_npu_launches_total{", "compiles": "st_npu_emulated_npu_compiles_total{"}
        counts = dict.fromkeys(prefixes, 0.0)
        for line in self.get("/metrics").splitlines():
            for key, prefix in prefixes.items():
                if line.startswith(prefix):
                    counts[key] += float(line.rsplit(" ", 1)[1])
        return counts

    def load(self, workload: str, model: str, clients: int, duration_s: float, max_requests: int) -> dict[str, Any]:
        before = self.counts(model)
        named = model if self.named else None
        latencies, errors, elapsed = asyncio.run(_load(self.url, {named: workload}, clients, duration_s,
                                                       max_requests))[named]
        after = self.counts(model)
        grown = {key: after[key] - before[key] for key in after}
        answered = max(len(latencies), 1)
        result = {"requests": len(latencies), "errors": errors, "seconds": elapsed,
                  "requests_per_s": len(latencies) / elapsed,
                  "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
                  "tokenized_at_admission_per_request": grown["admission"] / answered,
                  "tokenized_in_device_call_per_request": grown["device"] / answered}
        if after["launches"]:
            result["launches_per_request"] = grown["launches"] / answered
            result["compiles"] = grown["compiles"]
        return result

    def load_mixed(self, kinds: dict[str, str], clients: int, duration_s: float,
                   max_requests: int) -> dict[str, dict[str, Any]]:
        """``clients`` clients per model at once, each model's requests naming it; figures per model."""
        figures = {}
        for model, (latencies, errors, elapsed) in asyncio.run(
                _load(self.url, kinds, clients, duration_s, max_requests)).items():
            figures[model] = {"requests": len(latencies), "errors": errors, "seconds": elapsed,
                              "requests_per_s": len(latencies) / elapsed, "p50_ms": _ms(percentile(latencies, 50)),
                              "p99_ms": _ms(percentile(latencies, 99))}
        return figures

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(REQUEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


async def _load(url: str, workloads: dict[str | None, str], clients: int, duration_s: float,
                max_requests: int) -> dict[str | None, tuple[list[float], int, float]]:
    """``clients`` clients per model (``workloads``: model name, or None, to its workload) sending its requests back
    to back, all models at once; per model the latencies of the answered requests, the errors and the seconds."""
    latencies: dict[str | None, list[float]] = {model: [] for model in workloads}
    errors = dict.fromkeys(workloads, 0)
    sent = dict.fromkeys(workloads, 0)
    finished: dict[str | None, float] = {}
    total = clients * len(workloads)
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        end = start + duration_s

        async def one_client(model: str | None) -> None:
            while time.perf_counter() < end and sent[model] < max_requests:
                route, body = request_for(workloads[model], sent[model], model)
                sent[model] += 1
                begun = time.perf_counter()
                response = await client.post(route, json=body)
                if response.status_code == 200:
                    latencies[model].append(time.perf_counter() - begun)
                else:
                    errors[model] += 1
            finished[model] = max(finished.get(model, 0.0), time.perf_counter())

        await asyncio.gather(*(one_client(model) for model in workloads for _ in range(clients)))
        return {model: (latencies[model], errors[model], finished[model] - start) for model in workloads}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _row(result: dict[str, Any]) -> str:
    return (f"  {result['workload']:<6} {result['clients']:>3} clients  {result['server']:<14} "
            f"{result['requests_per_s']:8.1f} req/s  p50 {result['p50_ms'] or 0:7.1f} ms  "
            f"p99 {result['p99_ms'] or 0:7.1f} ms  errors {result['errors']}  tokenised per request "
            f"{result['tokenized_at_admission_per_request']:.1f} + {result['tokenized_in_device_call_per_request']:.1f}")


def _mixed_row(result: dict[str, Any]) -> str:
    return (f"  {result['model']:<12} {result['clients']:>3} clients  {result['server']:<9} "
            f"{result['requests_per_s']:8.1f} req/s  p50 {result['p50_ms'] or 0:7.1f} ms  "
            f"p99 {result['p99_ms'] or 0:7.1f} ms  errors {result['errors']}")


def format_mixed_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table: per model and client count, its figures alone and sharing the server."""
    lines = ["| model | kind | clients per model | alone req/s | together req/s | together / alone "
             "| p50 ms (alone / together) | p99 ms (alone / together) | errors |", "|" + "---|" * 9]
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for result in results:
        pairs.setdefault((result["model"], result["clients"]), {})[result["server"]] = result
    for (model, count), pair in pairs.items():
        alone, together = pair["alone"], pair["together"]
        ratio = together["requests_per_s"] / alone["requests_per_s"] if alone["requests_per_s"] else float("nan")
        lines.append(f"| {model} | {alone['kind']} | {count} | {alone['requests_per_s']:.1f} "
                     f"| {together['requests_per_s']:.1f} | {ratio:.2f}x "
                     f"| {alone['p50_ms'] or 0:.1f} / {together['p50_ms'] or 0:.1f} "
                     f"| {alone['p99_ms'] or 0:.1f} / {together['p99_ms'] or 0:.1f} "
                     f"| {alone['errors']} / {together['errors']} |")
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table: per client count, both servers' figures and the batching server's ratios."""
    emulated = any("launches_per_request" in result for result in results)
    header = "| clients | one-at-a-time req/s | batching req/s | speed | p50 ms (1-at-a-time / batching) " \
             "| p99 ms (1-at-a-time / batching) | texts tokenised per request (admission + device call) |"
    if emulated:
        header += " launches per request (1-at-a-time / batching) | compilations after warm-up |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    by_count: dict[int, dict[str, dict[str, Any]]] = {}
    for result in results:
        by_count.setdefault(result["clients"], {})[result["server"]] = result
    for count, pair in by_count.items():
        base, batched = pair["one-at-a-time"], pair["batching"]
        speed = batched["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else float("nan")
        line = (f"| {count} | {base['requests_per_s']:.1f} | {batched['requests_per_s']:.1f} | {speed:.2f}x "
                f"| {base['p50_ms']:.1f} / {batched['p50_ms']:.1f} | {base['p99_ms']:.1f} / {batched['p99_ms']:.1f} "
                f"| {batched['tokenized_at_admission_per_request']:.1f} + "
                f"{batched['tokenized_in_device_call_per_request']:.1f} |")
        if emulated:
            line += (f" {base.get('launches_per_request', 0):.1f} / {batched.get('launches_per_request', 0):.1f} "
                     f"| {base.get('compiles', 0):.0f} / {batched.get('compiles', 0):.0f} |")
        lines.append(line)
    return "\n".join(lines)
