"""The per-request event cap: at most N Sentry events per (provider, error_type) a minute.

Why in front of the SDK: in a failure flood the SDK's transport queue overflows and drops
events without a count we can trust (a 60 s flood of 503s lost 60 % of its events). Capping
each group before the SDK keeps the queue short, so what does reach Sentry is sent, and what
the cap holds back is *counted* (a metric, and a count on the group's next event) instead of
vanishing. Groups are bounded: providers come from the config, error types from the taxonomy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 60.0
Group = tuple[str, str]  # (provider, error_type)


@dataclass
class _GroupState:
    window_start: float
    sent: int = 0
    since_last: int = 0  # suppressed since this group's last admitted event
    suppressed: int = 0  # suppressed in total (the metric)


class EventCap:
    """Admits the first ``per_minute`` events of each group in each window; counts the rest.

    Windows are fixed: a group's window opens with its first event and lasts one minute.
    Thread-safe; the clock is injected so tests move time by hand.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._groups: dict[Group, _GroupState] = {}
        self._lock = threading.Lock()

    def admit(self, provider: str, error_type: str) -> int | None:
        """``None`` if this event is suppressed, else how many were suppressed before it
        (since the group's last admitted event), to be reported on it."""
        now = self._clock()
        with self._lock:
            state = self._groups.get((provider, error_type))
            if state is None or now - state.window_start >= WINDOW_SECONDS:
                carried = state.since_last if state else 0
                suppressed = state.suppressed if state else 0
                state = _GroupState(now, since_last=carried, suppressed=suppressed)
                self._groups[(provider, error_type)] = state
            if state.sent >= self.per_minute:
                state.since_last += 1
                state.suppressed += 1
                return None
            state.sent += 1
            reported, state.since_last = state.since_last, 0
            return reported

    def suppressed(self) -> dict[Group, int]:
        """Suppressed events per group since start (a counter: never decreases)."""
        with self._lock:
            return {group: state.suppressed for group, state in self._groups.items()}
