"""The state backend: where token buckets, failure windows and the alert throttle live.

Two implementations behind one small interface, chosen once at start-up:

- in-process (the default): ``ratelimit.RateLimiter`` and ``alerting.FailureTracker``, as
  they always were; nothing Redis-related is imported;
- Redis (``APIROUTER_REDIS_URL`` set): ``redis_state``, one atomic Lua script per decision,
  so N processes or replicas share one limit and raise one alert. It keeps an in-process
  pair as its fallback: while Redis is unreachable every decision is taken locally, and
  Redis never causes an error to a client.

Callers keep the signatures they had (``acquire(key, limit)``, ``record_failure(key,
failure)``, ``record_success(key)``), so switching backends is a constructor change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from apirouter.alerting import Alert, Failure, FailureTracker, Recovery
from apirouter.config import RateLimit
from apirouter.ratelimit import RateLimiter
from apirouter.settings import Settings


class Limiter(Protocol):
    def acquire(self, key: Any, limit: RateLimit) -> int | None:
        """Take one token: None when allowed, else the seconds to wait (Retry-After)."""
        ...

    def __len__(self) -> int:
        """Buckets held in this process's memory."""
        ...


class Tracker(Protocol):
    def record_failure(self, key: str, failure: Failure) -> Alert | None: ...

    def record_success(self, key: str) -> Recovery | None: ...

    def over_threshold(self, key: str) -> bool: ...


class RedisEvents(Protocol):
    """How the Redis backend tells the outside world (metrics, log, Sentry) about Redis."""

    def error(self, operation: str) -> None:
        """One Redis call failed (counted, every time)."""

    def down(self, reason: str) -> None:
        """An outage began: once per outage per process."""

    def up(self, outage_seconds: float) -> None:
        """Redis answers again after an outage."""


@dataclass
class StateBackend:
    limiter: Limiter
    tracker: Tracker
    health: Callable[[], dict[str, Any]]
    close: Callable[[], None] = lambda: None


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
    from apirouter import redis_state  # imported only in fleet mode

    fallback_limiter = RateLimiter(clock=clock)
    return redis_state.backend(settings, events, fallback_limiter, _local_tracker(settings, clock))


def _local_tracker(settings: Settings, clock: Callable[[], float]) -> FailureTracker:
    return FailureTracker(
        settings.alert_threshold,
        settings.alert_window_seconds,
        settings.alert_throttle_seconds,
        clock=clock,
    )


def identity(key: Hashable) -> str:
    """A string for any limiter key: ``(route, client key)`` tuples or plain strings."""
    if isinstance(key, tuple):
        return "\x1f".join(str(part) for part in key)
    return str(key)
