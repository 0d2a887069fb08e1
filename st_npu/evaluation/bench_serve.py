"""``st-npu bench-serve``: the batching server against a one-request-at-a-time server, same models and devices.

Both servers are ``st-npu serve`` subprocesses on 127.0.0.1 (the baseline with ``--one-at-a-time``: one device
call per request, one request at a time, the way a small web app around ``encode`` runs). For each workload
(``embed``: one short text per request to ``/v1/embeddings``; ``rerank``, with ``--reranker``: a query and
four short documents per request to ``/rerank``) and each client count, ``c`` clients send requests back to back
for ``--duration`` seconds or ``--max-requests`` requests, first to the baseline and then to the batching server.
Figures: requests per second, p50 and p99 latency (as the client sees it), errors, the texts tokenised per request
(at admission, and again inside the model's own API in the device call); on the emulated npu, the device launches
(kernels, transfers, graph replays) and compilations per request after warm-up, from the servers' ``/metrics``.

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


def request_for(workload: str, index: int) -> tuple[str, dict[str, Any]]:
    """The route and body of a workload's ``index``-th request."""
    text = SHORT_TEXTS[index % len(SHORT_TEXTS)]
    if workload == "rerank":
        return "/rerank", {"query": text, "texts": DOCUMENTS}
    return "/v1/embeddings", {"input": text, "model": "bench"}


def run_bench_serve(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost"):
        raise UsageError(f"bench-serve runs against 127.0.0.1 only, got --host {args.host}")
    clients = _client_counts(args.clients)
    servers = {name: _Server(args, one_at_a_time=name == "one-at-a-time") for name in SERVERS}
    results: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready()
        info = servers["batching"].get("/info")
        workloads = []
        for workload, served in (("embed", info if "embedding" in info["model_type"] else None),
                                 ("rerank", info.get("reranker", info if "reranker" in info["model_type"] else None))):
            if served is not None:
                workloads.append(workload)
                print(f"{workload}: {served['model_id']} on {', '.join(served['devices'])} ({served['model_dtype']}),"
                      f" static shapes {'on' if served['static_shapes'] else 'off'}", flush=True)
        print(f"{args.duration:g} s or {args.max_requests} requests per run", flush=True)
        for workload in workloads:
            for count in clients:
                for name, server in servers.items():
                    result = {"workload": workload, "clients": count, "server": name,
                              **server.load(workload, count, args.duration, args.max_requests)}
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

    def __init__(self, args: argparse.Namespace, one_at_a_time: bool) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "st_npu", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning",
                   "--max-batch-tokens", str(args.max_batch_tokens), "--max-batch-size", str(args.max_batch_size),
                   "--max-concurrent-requests", str(args.max_concurrent_requests)]
        for option, value in (("--model", args.model), ("--spec", args.spec), ("--device", args.device),
                              ("--devices", args.devices), ("--dtype", args.dtype), ("--reranker", args.reranker),
                              ("--reranker-devices", args.reranker_devices)):
            if value:
                command += [option, value]
        if one_at_a_time:
            command.append("--one-at-a-time")
        self.url = f"http://127.0.0.1:{self.port}"
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

    def counts(self, workload: str) -> dict[str, float]:
        """Texts tokenised by the workload's model (at admission, in the device call) and, on the emulated npu,
        launches (kernels, transfers, graph replays) and compilations so far."""
        prefixes = {"admission": f'st_npu_tokenizations_total{{model="{workload}",stage="admission"}}',
                    "device": f'st_npu_tokenizations_total{{model="{workload}",stage="device"}}',
                    "launches": "st_npu_emulated_npu_launches_total{", "compiles": "st_npu_emulated_npu_compiles_total{"}
        counts = dict.fromkeys(prefixes, 0.0)
        for line in self.get("/metrics").splitlines():
            for key, prefix in prefixes.items():
                if line.startswith(prefix):
                    counts[key] += float(line.rsplit(" ", 1)[1])
        return counts

    def load(self, workload: str, clients: int, duration_s: float, max_requests: int) -> dict[str, Any]:
        before = self.counts(workload)
        latencies, errors, elapsed = asyncio.run(_load(self.url, workload, clients, duration_s, max_requests))
        after = self.counts(workload)
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

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(REQUEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


async def _load(url: str, workload: str, clients: int, duration_s: float,
                max_requests: int) -> tuple[list[float], int, float]:
    """``clients`` clients sending the workload's requests back to back; latencies of the answered ones."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        end = start + duration_s

        async def one_client() -> None:
            nonlocal errors, sent
            while time.perf_counter() < end and sent < max_requests:
                route, body = request_for(workload, sent)
                sent += 1
                begun = time.perf_counter()
                response = await client.post(route, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - begun)
                else:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - start


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _row(result: dict[str, Any]) -> str:
    return (f"  {result['workload']:<6} {result['clients']:>3} clients  {result['server']:<14} "
            f"{result['requests_per_s']:8.1f} req/s  p50 {result['p50_ms'] or 0:7.1f} ms  "
            f"p99 {result['p99_ms'] or 0:7.1f} ms  errors {result['errors']}  tokenised per request "
            f"{result['tokenized_at_admission_per_request']:.1f} + {result['tokenized_in_device_call_per_request']:.1f}")


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
