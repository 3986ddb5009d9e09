"""The upstream failure tracker: decides *when* to alert, never *how*.

Per provider, a sliding window of failure times. When the failures in the last ``window``
seconds reach ``threshold``, an ``Alert`` is returned, at most once per ``throttle`` seconds
per provider; the first success after an alert returns a ``Recovery``. The caller emits
them (log line, metric, Sentry event). Thread-safe; the clock is injected so tests of
windows and throttles never sleep; memory is bounded per provider.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

REPEATED_FAILURES = "repeated_upstream_failures"
RECOVERED = "upstream_recovered"
MAX_SAMPLE_REQUEST_IDS = 5
MAX_REMEMBERED_FAILURES = 10_000


@dataclass(frozen=True)
class Failure:
    error_type: str
    status: int
    request_id: str


@dataclass(frozen=True)
class Alert:
    provider: str
    count: int
    threshold: int
    window_seconds: float
    last_error_type: str
    last_status: int
    sample_request_ids: tuple[str, ...]
    alert_type: str = REPEATED_FAILURES


@dataclass(frozen=True)
class Recovery:
    provider: str
    failures_since_alert: int
    alert_type: str = RECOVERED


@dataclass
class _ProviderState:
    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_REMEMBERED_FAILURES))
    recent: deque[Failure] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLE_REQUEST_IDS))
    last_alert_at: float | None = None
    alerting: bool = False
    failures_since_alert: int = 0


class FailureTracker:
    def __init__(
        self,
        threshold: int,
        window_seconds: float,
        throttle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.window_seconds = window_seconds
        self.throttle_seconds = throttle_seconds
        self._clock = clock
        self._states: dict[str, _ProviderState] = {}
        self._lock = threading.Lock()

    def record_failure(self, provider: str, failure: Failure) -> Alert | None:
        now = self._clock()
        with self._lock:
            state = self._states.setdefault(provider, _ProviderState())
            state.times.append(now)
            state.recent.append(failure)
            while state.times and state.times[0] <= now - self.window_seconds:
                state.times.popleft()
            if state.alerting:
                state.failures_since_alert += 1
            if len(state.times) < self.threshold or self._throttled(state, now):
                return None
            state.last_alert_at = now
            state.alerting = True
            state.failures_since_alert = 0
            return Alert(
                provider=provider,
                count=len(state.times),
                threshold=self.threshold,
                window_seconds=self.window_seconds,
                last_error_type=failure.error_type,
                last_status=failure.status,
                sample_request_ids=tuple(f.request_id for f in state.recent),
            )

    def record_success(self, provider: str) -> Recovery | None:
        state = self._states.get(provider)
        if state is None or not state.alerting:  # the common path takes no lock
            return None
        with self._lock:
            if not state.alerting:
                return None
            state.alerting = False
            state.times.clear()
            return Recovery(provider, state.failures_since_alert)

    def _throttled(self, state: _ProviderState, now: float) -> bool:
        return state.last_alert_at is not None and now - state.last_alert_at < self.throttle_seconds
