"""Prometheus metrics, in one registry owned by the app.

Labels have bounded values only: routes come from the route table (anything else is
``other``), methods from a fixed list, statuses are three-digit codes, providers and error
types come from config and the taxonomy. Never keys, client addresses or raw paths.
Latency buckets reach ten minutes, because LLM calls are slow.

Several worker processes (gunicorn ``-w N``): with ``PROMETHEUS_MULTIPROC_DIR`` set,
prometheus_client keeps each process's values in files there and ``render`` sums them, so
``/metrics`` reports the whole server whichever worker answers. Gauges computed by a
function (in flight, buckets) cannot be read across processes: each worker publishes them
into its files once a second (``publish``, driven by ``workers.py``) and they are summed
over live workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from apirouter import __version__

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode (read by prometheus_client at import, too)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class SampledGauge(Gauge):
    """A gauge whose value comes from a function, also in multiprocess mode.

    In one process it is read at scrape time (``set_function``). In multiprocess mode the
    scraping worker cannot call another worker's function, so ``publish`` copies the value
    into this process's file instead."""

    function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        self.function = f
        if multiprocess_dir() is None:
            super().set_function(f)

    def publish(self) -> None:
        if self.function is not None:
            self.set(self.function())


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "apirouter_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "apirouter_request_duration_seconds",
            "Time from request to last byte, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "apirouter_upstream_duration_seconds",
            "Time until the upstream's response headers arrived, by provider.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "apirouter_upstream_errors",
            "Upstream failures, by provider and error type.",
            ["provider", "error_type"],
            registry=registry,
        )
        self.client_disconnects = Counter(
            "apirouter_client_disconnects",
            "Clients that left before the response was complete.",
            ["route"],
            registry=registry,
        )
        self.in_flight = SampledGauge(
            "apirouter_requests_in_flight",
            "Requests being handled right now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rate_limiter_buckets = SampledGauge(
            "apirouter_rate_limiter_buckets",
            "Token buckets held in memory (in fleet mode: the local fallback's).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.alerts = Counter(
            "apirouter_alerts",
            "Alerts raised, by provider and alert type.",
            ["provider", "alert_type"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "apirouter_config_reloads",
            "Config file reloads, by result.",
            ["result"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "apirouter_redis_errors",
            "Failed Redis calls (each decided on local state instead), by operation.",
            ["operation"],
            registry=registry,
        )
        Gauge(
            "apirouter_build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        ).labels(__version__).set(1)

    def track_bucket_count(self, count: Callable[[], int]) -> None:
        self.rate_limiter_buckets.set_function(count)

    def method_label(self, method: str) -> str:
        return method if method in KNOWN_METHODS else "other"

    def publish(self) -> None:
        """Multiprocess mode: write this process's function gauges to its files."""
        self.in_flight.publish()
        self.rate_limiter_buckets.publish()

    def render(self) -> bytes:
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        self.publish()  # this worker's own gauges are fresh; others' at most 1 s old
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
