"""The state interface: what the limiter, the failure tracker and the Redis event sink
offer, whichever backend (in process or Redis) implements them."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from apirouter.config.provider import RateLimit
from apirouter.state.alerting import Alert, Failure, Recovery
from apirouter.state.checkins import CheckIns, LocalCheckIns


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
    check_ins: CheckIns = field(default_factory=LocalCheckIns)  # the dead man's switch


def identity(key: Hashable) -> str:
    """A string for any limiter key: ``(route, client key)`` tuples or plain strings."""
    if isinstance(key, tuple):
        return "\x1f".join(str(part) for part in key)
    return str(key)
