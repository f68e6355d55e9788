"""Prometheus metrics, one registry per service so several apps can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("muse_requests", "Requests by outcome", ["outcome"], registry=r)
        self.images = Counter("muse_images_generated", "Images generated", registry=r)
        self.interrupted = Counter(
            "muse_batches_interrupted", "Assignments stopped early: every request gone", registry=r
        )
        self.retries = Counter("muse_batches_retried", "Assignments retried after their worker died", registry=r)
        self.batch_size = Histogram(
            "muse_batch_size", "Images a worker runs once it took a batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.admissions = Counter(
            "muse_admissions",
            "Assignments handed to a worker: into=running joined images already running (step batching), "
            "into=idle started on an idle worker",
            ["into"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "muse_step_seconds", "Time between two denoising steps of a running request", buckets=STEP_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "muse_queue_seconds", "Time from accepted to running", buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "muse_compute_seconds", "Time the batch ran on a worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.total_seconds = Histogram(
            "muse_total_seconds", "Time from accepted to answered", buckets=LATENCY_BUCKETS, registry=r
        )

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(read)

    def counter_function(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (a running total), read at scrape time."""
        self.registry.register(_TotalCollector(name, doc, read))

    def labelled_gauge(self, name: str, doc: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_DictCollector(name, doc, label, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TotalCollector:
    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.read())


class _DictCollector:
    """A gauge whose labelled values are read at scrape time (workers by state)."""

    def __init__(self, name: str, doc: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self.name, self.doc, self.label, self.read = name, doc, label, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=[self.label])
        for key, value in self.read().items():
            family.add_metric([key], value)
        yield family
