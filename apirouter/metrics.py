"""Prometheus metrics, in one registry owned by the app.

Labels have bounded values only: routes come from the route table (anything else is
``other``), methods from a fixed list, statuses are three-digit codes, providers and error
types come from config and the taxonomy. Never keys, client addresses or raw paths.
Latency buckets reach ten minutes, because LLM calls are slow.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from apirouter import __version__

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self.in_flight = Gauge(
            "apirouter_requests_in_flight", "Requests being handled right now.", registry=registry
        )
        self.requests_refused = Counter(
            "apirouter_requests_refused",
            "Requests refused before any upstream work, by reason: over_capacity, "
            "key_over_capacity (503), header_timeout (408, headers or body too slow).",
            ["reason"],
            registry=registry,
        )
        self.streams_in_flight = Gauge(
            "apirouter_streams_in_flight",
            "Streamed (SSE) responses being relayed right now.",
            registry=registry,
        )
        self.rate_limiter_buckets = Gauge(
            "apirouter_rate_limiter_buckets", "Token buckets held in memory.", registry=registry
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
        Gauge(
            "apirouter_build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=registry,
        ).labels(__version__).set(1)

    def track_bucket_count(self, count: Callable[[], int]) -> None:
        self.rate_limiter_buckets.set_function(count)

    def track_capacity(self, streams: Callable[[], int], reasons: tuple[str, ...]) -> None:
        """Read the stream gauge from the capacity gate; show every refusal reason at 0."""
        self.streams_in_flight.set_function(streams)
        for reason in reasons:
            self.requests_refused.labels(reason)

    def method_label(self, method: str) -> str:
        return method if method in KNOWN_METHODS else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
