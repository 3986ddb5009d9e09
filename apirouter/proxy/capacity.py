"""Admission by capacity: at most N proxied requests in flight, optionally M per client key.

Why a gate in the app rather than the server's queue: a WSGI server queues what it cannot
serve yet, silently, for as long as it takes. A client (or its load balancer) is better off
with an immediate 503 ``over_capacity`` it can retry elsewhere. So every proxied request
takes a slot before any upstream work and gives it back exactly once when its response is
finished (for a stream: when the relay closes). Local routes (/health, /metrics,
/v1/models) take no slot, so they answer however full the router is.

The gate also carries the process's readiness: ``draining`` is set the moment SIGTERM
arrives, and ``/health/ready`` reads it together with the free capacity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from apirouter.config.settings import Settings
from apirouter.errors import OverCapacity
from apirouter.observe.metrics import Metrics

REFUSAL_REASONS = ("over_capacity", "key_over_capacity", "header_timeout")
RETRY_AFTER_SECONDS = 1
R = TypeVar("R")


class Slot:
    """One admitted request's hold on the gate. ``release`` is idempotent."""

    __slots__ = ("_gate", "_key", "_released", "_streaming")

    def __init__(self, gate: CapacityGate, key: str) -> None:
        self._gate = gate
        self._key = key
        self._released = False
        self._streaming = False

    def mark_stream(self) -> None:
        """Count this request as a relayed stream until it is released."""
        self._gate._mark_stream(self)

    def release(self) -> None:
        self._gate._release(self)


class CapacityGate:
    """Thread-safe counters of proxied requests in flight, in total and per client key."""

    def __init__(
        self,
        limit: int,
        per_key: int = 0,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limit = limit
        self.per_key = per_key
        self.on_refused = on_refused
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._streams = 0
        self._by_key: dict[str, int] = {}  # only keys with requests in flight: bounded

    def acquire(self, key: str) -> Slot:
        """Take a slot for a request from ``key`` (an anonymized label), or raise at once."""
        with self._lock:
            if self._in_flight >= self.limit:
                reason = "over_capacity"
            elif self.per_key and self._by_key.get(key, 0) >= self.per_key:
                reason = "key_over_capacity"
            else:
                self._in_flight += 1
                self._by_key[key] = self._by_key.get(key, 0) + 1
                return Slot(self, key)
        self.on_refused(reason)
        raise OverCapacity(_REFUSALS[reason].format(self=self), RETRY_AFTER_SECONDS)

    def admit(self, key: str, handle: Callable[[], R]) -> R:
        """Run ``handle`` holding a slot; a streamed response keeps it until it closes.

        A response whose ``relay`` is set takes the slot with it (``relay.hold``); any
        other response, or an exception, gives it back here.
        """
        slot = self.acquire(key)
        try:
            response = handle()
        except BaseException:
            slot.release()
            raise
        relay = getattr(response, "relay", None)
        if relay is None:
            slot.release()
        else:
            relay.hold(slot)
        return response

    def _mark_stream(self, slot: Slot) -> None:
        with self._lock:
            if not slot._released and not slot._streaming:
                slot._streaming = True
                self._streams += 1

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if slot._released:
                return
            slot._released = True
            self._in_flight -= 1
            self._streams -= slot._streaming
            left = self._by_key[slot._key] - 1
            if left:
                self._by_key[slot._key] = left
            else:
                del self._by_key[slot._key]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def streams(self) -> int:
        return self._streams

    def snapshot(self) -> dict[str, Any]:
        """The ``capacity`` object of the /health document."""
        return {
            "in_flight": self._in_flight,
            "limit": self.limit,
            "available": max(0, self.limit - self._in_flight),
            "streams": self._streams,
            "per_key_limit": self.per_key or None,
            "draining": self.draining.is_set(),
        }


def build_gate(settings: Settings, metrics: Metrics) -> CapacityGate:
    """The app's gate, sized from settings, counting refusals and streams in ``metrics``."""
    gate = CapacityGate(
        settings.max_concurrent,
        settings.max_concurrent_per_key,
        on_refused=lambda reason: metrics.requests_refused.labels(reason).inc(),
    )
    metrics.track_capacity(lambda: gate.streams, REFUSAL_REASONS, settings.max_concurrent)
    return gate


_REFUSALS = {
    "over_capacity": "This router is at capacity ({self.limit} requests in flight); "
    "retry shortly or on another replica.",
    "key_over_capacity": "This API key already has {self.per_key} requests in flight, "
    "the most one key may hold; retry when one finishes.",
}


def readiness(gate: CapacityGate, config_loaded: bool) -> tuple[int, dict[str, Any]]:
    """The /health/ready answer: 200 when this router can take traffic, else 503.

    Never consults upstream health: during a provider outage every replica would turn
    unready at once and clients would get connection refused instead of a clear error.
    """
    checks = {
        "config_loaded": config_loaded,
        "not_draining": not gate.draining.is_set(),
        "capacity_left": gate.in_flight < gate.limit,
    }
    ready = all(checks.values())
    return (200 if ready else 503), {"ready": ready, "checks": checks}
