"""The server's Prometheus metrics, in a registry of its own (several servers can live in one process).

Two families side by side, each with a ``model`` label (the served model's name): st_npu's own (``st_npu_``) and
text-embeddings-inference's names, labels and histogram buckets (``te_``, from TEI's router), so dashboards and
alerts built on TEI read this server too. TEI's counters carry no ``_total`` suffix (its exporter adds none);
prometheus-client adds one to every counter it types as such, so those few are exposed untyped under TEI's names.
TEI counts per input: ``te_embed_count``, ``te_predict_count``, ``te_request_input_length``, ``te_batch_next_size``
and ``te_queue_size`` count texts (or pairs), not requests.

On the emulated npu the registry also reports the emulator's operator launches and compilations per device,
read at scrape time: ``st-npu bench-serve`` divides their growth by the requests served. They count what an
Ascend device would be asked to launch and compile, not how fast it would do it.
"""

from __future__ import annotations

from typing import Any

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from st_npu.runtime import emulation

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# TEI's (router/src/prometheus.rs): durations 10 us x 1.5^k for k = 1..35; input lengths and batch sizes powers of two
TEI_DURATION_BUCKETS = tuple(0.00001 * 1.5 ** k for k in range(1, 36))
TEI_BATCH_SIZE_BUCKETS = tuple(float(2 ** k) for k in range(13))
TEI_BATCH_TOKENS_BUCKETS = tuple(float(2 ** k) for k in range(21))
TEI_COUNTERS = {
    "te_request_count": ("Requests received, by method (single input or batch)", ("model", "method")),
    "te_request_success": ("Requests answered, by method", ("model", "method")),
    "te_request_failure": ("Requests failed, by reason (TEI's: validation, batch_size, model_type, tokenization, "
                           "overloaded, dropped, inference; st_npu's: deadline)", ("model", "err")),
    "te_embed_count": ("Inputs received for embedding", ("model",)),
    "te_embed_success": ("Inputs embedded", ("model",)),
    "te_predict_count": ("Inputs (pairs) received for prediction or reranking", ("model",)),
    "te_predict_success": ("Inputs (pairs) predicted or reranked", ("model",)),
}
FAILURES = ("validation", "batch_size", "model_type", "tokenization", "overloaded", "dropped", "inference", "deadline")


class Metrics:
    """``devices``: every model's; ``max_input_length``: the longest a model takes (the top input-length bucket)."""

    def __init__(self, devices: list[Any], max_input_length: int = 512) -> None:
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
        self.expired = Counter("st_npu_requests_expired", "Requests answered 504: their deadline passed before any "
                               "of their rows reached a device", ["model"], registry=self.registry)
        self.tei = _ExactCounters(TEI_COUNTERS)
        self.registry.register(self.tei)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = TEI_DURATION_BUCKETS) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry)

        self.te = {stage: histogram(f"te_request_{stage}" if stage == "duration" else f"te_request_{stage}_duration",
                                    f"Request {stage} time in seconds" if stage != "duration" else
                                    "Request time in seconds, end to end")
                   for stage in ("duration", "tokenization", "queue", "inference")}
        for task in ("embed", "predict"):
            for stage in ("duration", "tokenization", "queue", "inference"):
                name = f"te_{task}_duration" if stage == "duration" else f"te_{task}_{stage}_duration"
                self.te[f"{task}_{stage}"] = histogram(name, f"Per input of {task}: {stage} time in seconds")
        lengths = tuple(float(2 ** k) for k in range(20) if 2 ** k <= max_input_length)
        self.te["input_length"] = histogram("te_request_input_length", "Tokens per input", lengths)
        self.te["batch_size"] = histogram("te_batch_next_size", "Inputs per batch", TEI_BATCH_SIZE_BUCKETS)
        self.te["batch_tokens"] = histogram("te_batch_next_tokens", "Tokens per batch (not padded)",
                                            TEI_BATCH_TOKENS_BUCKETS)
        self.te_queue = Gauge("te_queue_size", "Inputs waiting in the queue", ["model"], registry=self.registry)
        emulated = [device for device in devices if emulation.is_emulated(device)]
        if emulated:
            self.registry.register(_EmulatorCollector(emulated))

    def observe_batch(self, model: str, device: str, batch: list[Any], compute_s: float, started: float) -> None:
        """``batch``: (job, rows slice) pairs of one device call."""
        rows = sum(part.stop - part.start for _, part in batch)
        self.batch_texts.labels(model, device).observe(rows)
        self.batch_requests.labels(model, device).observe(len(batch))
        self.compute_seconds.labels(model, device).observe(compute_s)
        self.te["batch_size"].labels(model).observe(rows)
        self.te["batch_tokens"].labels(model).observe(sum(len(ids) for job, part in batch for ids in job.encodings[part]))
        for job, _ in batch:
            self.queue_seconds.labels(model).observe(started - job.queued_at)

    def queue_size(self, model: str, rows: int) -> None:
        self.te_queue.labels(model).set(rows)

    def count(self, name: str, *labels: str, amount: float = 1) -> None:
        self.tei.inc(name, labels, amount)

    def start_model(self, model: str, task: str) -> None:
        """Show a model's series from the start (at zero), as dashboards expect them; ``task``: embed or predict."""
        for method in ("single", "batch"):
            for name in ("te_request_count", "te_request_success"):
                self.count(name, model, method, amount=0)
        for err in FAILURES:
            self.count("te_request_failure", model, err, amount=0)
        self.count(f"te_{task}_count", model, amount=0)
        self.count(f"te_{task}_success", model, amount=0)
        self.te_queue.labels(model).set(0)

    def observe_request(self, model: str, task: str, lengths: list[int], total_s: float, tokenization_s: float,
                        queue_s: float, inference_s: float) -> None:
        """An answered request: TEI's request histograms once, its per-input ones once per input."""
        for stage, seconds in (("duration", total_s), ("tokenization", tokenization_s), ("queue", queue_s),
                               ("inference", inference_s)):
            self.te[stage].labels(model).observe(seconds)
            for _ in lengths:
                self.te[f"{task}_{stage}"].labels(model).observe(seconds)
        for length in lengths:
            self.te["input_length"].labels(model).observe(length)
        self.count(f"te_{task}_success", model, amount=len(lengths))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ExactCounters:
    """Counters exposed under their exact names (untyped: prometheus-client would add ``_total`` to a counter)."""

    def __init__(self, families: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        self.families = families
        self.values: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
        self.lock = threading.Lock()

    def inc(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        with self.lock:
            series = self.values[name]
            series[labels] = series.get(labels, 0.0) + amount

    def collect(self) -> Any:
        with self.lock:
            snapshot = {name: dict(series) for name, series in self.values.items()}
        for name, (documentation, label_names) in self.families.items():
            family = Metric(name, documentation, "unknown")
            for labels, value in sorted(snapshot.get(name, {}).items()):
                family.add_sample(name, dict(zip(label_names, labels)), value)
            yield family


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
