"""Who sends the dead man's switch check-in, and what its last result was.

One process: it always sends, and /health shows its own result. A fleet (Redis): one
check-in per interval between every replica (``RedisCheckIns`` in ``redis_backend``), and
the sender's result is shared, so every replica's /health shows it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CheckInResult:
    """Sentry's answer to one check-in, in /health's words (``ok``, ``rejected``,
    ``rate_limited``, ``unreachable``), and when it came (Unix time)."""

    state: str
    at: float


class CheckIns(Protocol):
    def claim(self, interval: float) -> bool:
        """Whether this process sends the check-in of the current interval."""
        ...

    def record(self, result: CheckInResult, interval: float) -> None:
        """Keep the result of a check-in this process sent (for 2 intervals in a fleet)."""
        ...

    def latest(self) -> CheckInResult | None:
        """The newest result known: this process's, or the fleet's sender's."""
        ...


class LocalCheckIns:
    """One process: every interval is this process's to send."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: CheckInResult | None = None

    def claim(self, interval: float) -> bool:
        return True

    def record(self, result: CheckInResult, interval: float) -> None:
        with self._lock:
            self._latest = result

    def latest(self) -> CheckInResult | None:
        with self._lock:
            return self._latest
