"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Uses prometheus_client (the reference Python client) for the exposition format instead of writing
the text format by hand.
"""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: dense around the 5-100 ms range a CPU encoder serves in, coarse up to the request timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
disable_created_metrics()  # the *_created timestamp series only add noise to a scrape

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Latency per endpoint, requests by status, batch sizes, queue depth, rejections, streaming figures."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("slimcart_request_latency_seconds", "End-to-end server time of answered requests",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("slimcart_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.batch_size = Histogram("slimcart_batch_size", "Items (texts, histories) per model call", ["queue"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("slimcart_batch_seconds", "Model time per batch", ["queue"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("slimcart_queue_depth", "Items waiting for the model", ["queue"], registry=r)
        self.rejections = Counter("slimcart_rejections", "Requests refused to protect latency and memory",
                                  ["queue", "reason"], registry=r)
        self.loop_lag = Gauge("slimcart_event_loop_lag_seconds", "How late the event loop runs (HTTP-side queueing)",
                              registry=r)
        self.inflight = Gauge("slimcart_inflight_requests", "Requests being handled", registry=r)
        self.ttft = Histogram("slimcart_time_to_first_token_seconds", "Time to the first streamed token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("slimcart_generated_tokens", "Tokens generated", registry=r)
        self.active_streams = Gauge("slimcart_active_streams", "Generation streams being decoded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
