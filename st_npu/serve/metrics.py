"""The server's Prometheus metrics, in a registry of its own (several servers can live in one process).

On the emulated npu the registry also reports the emulator's operator launches and compilations per device,
read at scrape time: ``st-npu bench-serve`` divides their growth by the requests served. They count what an
Ascend device would be asked to launch and compile, not how fast it would do it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from st_npu.runtime import emulation

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, devices: list[Any]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("st_npu_requests", "HTTP requests answered, by route", ["route"],
                                registry=self.registry)
        self.errors = Counter("st_npu_request_errors", "Requests refused or failed, by route and HTTP status",
                              ["route", "status"], registry=self.registry)
        self.in_progress = Gauge("st_npu_requests_in_progress", "Model requests admitted and not yet answered",
                                 registry=self.registry)
        self.batch_texts = Histogram("st_npu_batch_size", "Rows (texts or pairs) per batch run on a device",
                                     ["model", "device"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("st_npu_batch_requests", "Requests gathered into one batch",
                                        ["model", "device"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("st_npu_queue_seconds", "Time a request waited before its batch ran",
                                       ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("st_npu_compute_seconds", "Time a batch took on its device",
                                         ["model", "device"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.tokens = Counter("st_npu_tokens", "Tokens computed (prompt and special tokens included)", ["model"],
                              registry=self.registry)
        self.tokenizations = Counter("st_npu_tokenizations", "Rows tokenised: at admission, and again by the "
                                     "model's own API in the device call", ["model", "stage"], registry=self.registry)
        self.abandoned = Counter("st_npu_requests_abandoned", "Requests whose client went away before the answer",
                                 ["model"], registry=self.registry)
        emulated = [device for device in devices if emulation.is_emulated(device)]
        if emulated:
            self.registry.register(_EmulatorCollector(emulated))

    def observe_batch(self, model: str, device: str, batch: list[Any], compute_s: float, started: float) -> None:
        """``batch``: (job, rows slice) pairs of one device call."""
        self.batch_texts.labels(model, device).observe(sum(rows.stop - rows.start for _, rows in batch))
        self.batch_requests.labels(model, device).observe(len(batch))
        self.compute_seconds.labels(model, device).observe(compute_s)
        for job, _ in batch:
            self.queue_seconds.labels(model).observe(started - job.queued_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EmulatorCollector:
    def __init__(self, devices: list[Any]) -> None:
        self.indices = sorted({device.index or 0 for device in devices})

    def collect(self) -> Any:
        ops = CounterMetricFamily("st_npu_emulated_npu_ops", "Operators launched on the emulated npu",
                                  labels=["device"])
        compiles = CounterMetricFamily("st_npu_emulated_npu_compiles", "Operator compilations on the emulated npu",
                                       labels=["device"])
        launches = CounterMetricFamily("st_npu_emulated_npu_launches", "Work put on the emulated npu: kernels, "
                                       "transfers, graph replays (one each)", labels=["device"])
        replays = CounterMetricFamily("st_npu_emulated_npu_graph_replays", "Captured graphs replayed on the emulated "
                                      "npu", labels=["device"])
        for index in self.indices:
            counted = emulation.counters(f"npu:{index}")
            ops.add_metric([f"npu:{index}"], counted.ops)
            compiles.add_metric([f"npu:{index}"], counted.compiles)
            launches.add_metric([f"npu:{index}"], counted.launches)
            replays.add_metric([f"npu:{index}"], counted.replays)
        yield from (ops, compiles, launches, replays)
