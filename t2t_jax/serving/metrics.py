"""The server's Prometheus metrics, in a registry of its own (no process-wide state):
requests by status, sentences and tokens, request latency, batch sizes and times, queue depth."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from t2t_jax.serving.batcher import BatchRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The counters the server updates; `text()` is what GET /metrics returns."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("t2t_requests", "HTTP requests to /v1/translate, by status",
                                ["status"], registry=registry)
        self.sentences = Counter("t2t_sentences", "sentences translated", registry=registry)
        self.tokens = Counter("t2t_output_tokens", "target tokens of the best hypotheses, EOS "
                              "included", registry=registry)
        self.latency = Histogram("t2t_request_latency_seconds", "time from a request's arrival "
                                 "to its answer", buckets=LATENCY_BUCKETS, registry=registry)
        sizes = sorted({1 << k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("t2t_batch_size", "sentences per search", buckets=sizes,
                                    registry=registry)
        self.batch_seconds = Histogram("t2t_batch_seconds", "time of one batch's search",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_wait = Histogram("t2t_batch_wait_seconds", "how long a batch's oldest "
                                    "sentence waited before its search began",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.continuous = Counter("t2t_continuous_sentences", "greedy sentences that took a "
                                  "slot of continuous batching (the others are in batches)",
                                  registry=registry)
        self.queue_depth = Gauge("t2t_queue_depth", "sentences waiting for a batch",
                                 registry=registry)
        self.queue_depth.set_function(queue_depth)
        self.compile_seconds = Gauge("t2t_compile_seconds", "time to compile every served "
                                     "shape at start-up", registry=registry)

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_size.observe(record.sentences)
        self.batch_seconds.observe(record.seconds)
        self.batch_wait.observe(record.waited_s)
        if record.continuous:
            self.continuous.inc(record.sentences)

    def text(self) -> bytes:
        return generate_latest(self.registry)
