"""The state backend: where token buckets, failure windows and the alert throttle live.

Two implementations behind one small interface, chosen once at start-up:

- in-process (the default): ``ratelimit.RateLimiter`` and ``alerting.FailureTracker``, as
  they always were; nothing Redis-related is imported;
- Redis (``APIROUTER_REDIS_URL`` set): ``redis_backend``, one atomic Lua script per decision,
  so N processes or replicas share one limit and raise one alert. It keeps an in-process
  pair as its fallback: while Redis is unreachable every decision is taken locally, and
  Redis never causes an error to a client.

Callers keep the signatures they had (``acquire(key, limit)``, ``record_failure(key,
failure)``, ``record_success(key)``), so switching backends is a constructor change.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from apirouter.config.settings import Settings
from apirouter.state.alerting import FailureTracker
from apirouter.state.interface import RedisEvents, StateBackend
from apirouter.state.ratelimit import RateLimiter


def local(settings: Settings, clock: Callable[[], float] = time.monotonic) -> StateBackend:
    """In-process state: exact for one process, per-process for several."""
    return StateBackend(
        limiter=RateLimiter(clock=clock),
        tracker=_local_tracker(settings, clock),
        health=lambda: {"state": "off"},
    )


def build(
    settings: Settings,
    events: RedisEvents,
    clock: Callable[[], float] = time.monotonic,
) -> StateBackend:
    """The backend the settings ask for: Redis when ``APIROUTER_REDIS_URL`` is set."""
    if not settings.redis_url:
        return local(settings, clock)
    from apirouter.state import redis_backend  # imported only in fleet mode

    fallback_limiter = RateLimiter(clock=clock)
    return redis_backend.backend(
        settings, events, fallback_limiter, _local_tracker(settings, clock)
    )


def _local_tracker(settings: Settings, clock: Callable[[], float]) -> FailureTracker:
    return FailureTracker(
        settings.alert_threshold,
        settings.alert_window_seconds,
        settings.alert_throttle_seconds,
        clock=clock,
    )
