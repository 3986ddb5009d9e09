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
from collections.abc import Callable, Iterable
from typing import Self

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from apirouter import __version__
from apirouter.observe import delivery
from apirouter.observe.delivery import REASONS, STATES, DeliveryReport

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SENTRY_STATES = ("off", *STATES)  # the words of /health's ``sentry.state``


class SentryCollector(Collector):
    """Sentry delivery, read at scrape time from the long-lived delivery state of the SDK
    client (one per process, like the SDK itself): suppressed, dropped, failed, last accepted.
    With Sentry off the families are there with no samples."""

    def __init__(self, source: Callable[[], DeliveryReport | None]) -> None:
        self._source = source
        # /health's sentry state, when the app says it (a fleet's check-in result included)
        self.state_source: Callable[[], str] | None = None

    def collect(self) -> Iterable[Metric]:
        suppressed = CounterMetricFamily(
            "apirouter_sentry_events_suppressed",
            "Per-request events held back by APIROUTER_SENTRY_EVENTS_PER_MINUTE.",
            labels=["provider", "error_type"],
        )
        dropped = CounterMetricFamily(
            "apirouter_sentry_events_dropped",
            "Events lost on the way to Sentry, by reason (deliberate drops excluded).",
            labels=["reason"],
        )
        failures = CounterMetricFamily(
            "apirouter_sentry_delivery_failures",
            "Deliveries to Sentry that failed (alerts count each attempt), by reason.",
            labels=["reason"],
        )
        last = GaugeMetricFamily(
            "apirouter_sentry_last_accepted_timestamp_seconds",
            "Unix time Sentry last accepted an envelope; 0 if never.",
        )
        state = GaugeMetricFamily(
            "apirouter_sentry_state",
            "1 for the current state of /health's sentry object (the last answer from "
            "Sentry), 0 for the others.",
            labels=["state"],
        )
        report = self._source()
        current = "off" if report is None else report.state
        if self.state_source is not None:
            current = self.state_source()
        for word in SENTRY_STATES:
            state.add_metric([word], 1.0 if word == current else 0.0)
        if report is not None:
            for (provider, error_type), count in report.suppressed.items():
                suppressed.add_metric([provider, error_type], count)
            for reason in REASONS:
                dropped.add_metric([reason], report.dropped[reason])
                failures.add_metric([reason], report.failures[reason])
            last.add_metric([], report.last_accepted or 0.0)
        return [suppressed, dropped, failures, last, state]


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode (read by prometheus_client at import, too)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class KnownChildren(MetricWrapperBase):
    """A labelled metric whose ``labels(...)`` answers from a dict after the first call.

    prometheus_client's ``labels`` checks, converts and locks on every call: seven calls a
    request were a tenth of the router's own bookkeeping per plain request. Label values
    are bounded (see the module docstring), so the dict is too; children are never removed.
    """

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        known: dict[tuple[object, ...], Self] = self.__dict__.setdefault("known_children", {})
        child = known.get(labelvalues)
        if child is None:
            child = known[labelvalues] = super().labels(*labelvalues)
        return child


class Counter(KnownChildren, prometheus_client.Counter):
    pass


class Histogram(KnownChildren, prometheus_client.Histogram):
    pass


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
    def __init__(
        self, sentry: Callable[[], DeliveryReport | None] = delivery.current_report
    ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.sentry = SentryCollector(sentry)
        registry.register(self.sentry)
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
        self.tokens = Counter(
            "apirouter_tokens",
            "Tokens by provider, model (mapped upstream model, else other) and kind: input "
            "(all billed input, cached included), cached_input, output.",
            ["provider", "model", "kind"],
            registry=registry,
        )
        self.tokens_by_key = Counter(
            "apirouter_tokens_by_key",
            "Tokens per anonymised client key (APIROUTER_METRICS_PER_KEY=1; at most "
            "1000 keys, then other) and kind.",
            ["client_key", "kind"],
            registry=registry,
        )
        self.time_to_first_byte = Histogram(
            "apirouter_time_to_first_byte_seconds",
            "From sending the request upstream to the first byte of its answer's body.",
            ["provider", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stream_duration = Histogram(
            "apirouter_stream_duration_seconds",
            "From the first to the last byte of a relayed SSE stream.",
            ["provider", "route"],
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
            "Clients that left before the response was complete (reason: "
            "client_disconnected, or client_stalled: accepted no byte for the write timeout).",
            ["route", "reason"],
            registry=registry,
        )
        self.in_flight = SampledGauge(
            "apirouter_requests_in_flight",
            "Requests being handled right now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.capacity_limit = Gauge(
            "apirouter_capacity_limit",
            "Proxied requests this router admits at once (APIROUTER_MAX_CONCURRENT).",
            registry=registry,
            multiprocess_mode="livesum",
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
        self.upstream_attempts = Counter(
            "apirouter_upstream_attempts",
            "Attempts sent upstream, by provider, upstream and outcome (ok, failed, rate_limited).",
            ["provider", "upstream", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "apirouter_retries",
            "Attempts retried, by provider and reason (connect, timeout, 5xx, 429).",
            ["provider", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "apirouter_fallbacks",
            "Requests sent on to a fallback provider.",
            ["from_provider", "to_provider"],
            registry=registry,
        )
        self.health_checks = Counter(
            "apirouter_health_checks",
            "Active health checks, by provider, upstream and result (ok or an error type).",
            ["provider", "upstream", "result"],
            registry=registry,
        )
        self.upstream_state = Gauge(
            "apirouter_upstream_state",
            "Breaker state per upstream: 0 healthy, 1 cooling down, 2 probing.",
            ["provider", "upstream"],
            registry=registry,
        )
        self.upstream_parked = Gauge(
            "apirouter_upstream_parked",
            "Scopes (models, or the whole upstream) parked after a 429 on an operator key.",
            ["provider", "upstream"],
            registry=registry,
        )
        self.upstream_cooling = Gauge(
            "apirouter_upstream_cooling",
            "Models cooling down on an upstream after their own repeated failures.",
            ["provider", "upstream"],
            registry=registry,
        )
        self.can_serve = SampledGauge(
            "apirouter_can_serve",
            "1 while the provider has an upstream or fallback to send requests to, as "
            "/health's can_serve; 0 when every one is cooling down.",
            ["provider"],
            registry=registry,
            multiprocess_mode="livemin",
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
        self._sampled: list[SampledGauge] = [self.in_flight, self.rate_limiter_buckets]

    def track_bucket_count(self, count: Callable[[], int]) -> None:
        self.rate_limiter_buckets.set_function(count)

    def track_capacity(
        self, streams: Callable[[], int], reasons: tuple[str, ...], limit: int
    ) -> None:
        """Read the stream gauge from the capacity gate; show every refusal reason at 0."""
        self.streams_in_flight.set_function(streams)
        self.capacity_limit.set(limit)
        for reason in reasons:
            self.requests_refused.labels(reason)

    def track_sentry_state(self, state: Callable[[], str]) -> None:
        """Read ``apirouter_sentry_state`` from /health's sentry state."""
        self.sentry.state_source = state

    def track_can_serve(self, provider: str, can_serve: Callable[[], bool]) -> None:
        """Export /health's ``can_serve`` for the provider, read at scrape time."""
        child = self.can_serve.labels(provider)
        child.set_function(lambda: float(can_serve()))
        self._sampled.append(child)

    def track_redis(self, up: Callable[[], bool]) -> None:
        """Fleet mode only: ``apirouter_redis_up``, as /health's ``redis.state``. Without
        Redis the metric is absent rather than 0, so "Redis down" cannot fire on a router
        that was never meant to use one."""
        gauge = SampledGauge(
            "apirouter_redis_up",
            "1 while Redis answers (fleet mode), 0 while this process decides locally.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        gauge.set_function(lambda: float(up()))
        self._sampled.append(gauge)

    def method_label(self, method: str) -> str:
        return method if method in KNOWN_METHODS else "other"

    def publish(self) -> None:
        """Multiprocess mode: write this process's function gauges to its files."""
        for gauge in self._sampled:
            gauge.publish()

    def render(self) -> bytes:
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        self.publish()  # this worker's own gauges are fresh; others' at most 1 s old
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
