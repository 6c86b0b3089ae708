"""Prometheus metrics of `dimoo serve`, in a registry of their own (several apps may live in one test process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Queue depth, batch occupancy (prompt rows in running groups), tokens of work admitted, step latency, requests
    by status."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dimoo_queue_depth", "requests waiting for rows", registry=self.registry)
        self.batch_rows = Gauge("dimoo_batch_rows", "prompt rows in running groups", registry=self.registry)
        self.tokens = Gauge("dimoo_tokens_in_flight", "tokens of queued and running work", registry=self.registry)
        self.step_seconds = Histogram(
            "dimoo_step_seconds",
            "one step (one forward) of one group",
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10),
            registry=self.registry,
        )
        self.requests = Counter(
            "dimoo_requests", "requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
