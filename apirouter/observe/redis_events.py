"""What a Redis outage looks like from outside: a metric, one log line, one Sentry event.

The Redis backend (``redis_state.RedisLink``) decides when an outage begins and ends; this
says so, once each per process (processes cannot coordinate without Redis): every failed
call counts in ``apirouter_redis_errors_total``; the outage logs one line and sends one
``redis_unavailable`` event; the recovery logs one line and sends ``redis_recovered``.
"""

from __future__ import annotations

import logging

from apirouter.observe import tracking
from apirouter.observe.metrics import Metrics

log = logging.getLogger("apirouter.redis")


class RedisEventReporter:
    """Implements ``state.RedisEvents`` with the app's metrics, log and Sentry."""

    def __init__(self, metrics: Metrics, tracking_enabled: bool) -> None:
        self._metrics = metrics
        self._tracking = tracking_enabled

    def error(self, operation: str) -> None:
        self._metrics.redis_errors.labels(operation).inc()

    def down(self, reason: str) -> None:
        extra: dict[str, object] = {
            "fields": {"event": tracking.REDIS_UNAVAILABLE, "reason": reason}
        }
        if self._tracking:
            tracking.capture_redis_unavailable(reason)
            extra.update(tracking.ALREADY_CAPTURED)
        log.error(
            "Redis unavailable: serving on local state (limits and alerts per process) "
            "until it answers again",
            extra=extra,
        )

    def up(self, outage_seconds: float) -> None:
        if self._tracking:
            tracking.capture_redis_recovered(outage_seconds)
        log.warning(
            "Redis available again: state is shared across the fleet",
            extra={
                "fields": {
                    "event": tracking.REDIS_RECOVERED,
                    "outage_seconds": round(outage_seconds, 3),
                }
            },
        )
