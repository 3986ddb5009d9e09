"""The upstream failure tracker: decides *when* to alert, never *how*.

Per upstream (key ``provider/upstream``), a sliding window of failed *requests*: a request
whose attempts failed twice on one upstream counts once, so ``count`` and the sample request
ids say how many users were hurt, not how often the router tried. Every failure counts,
whatever its scope (a model's 5xx as well as a refused connection), and the alert names the
models involved. When the failed requests in the last ``window`` seconds reach
``threshold``, an ``Alert`` is returned, at most once per ``throttle`` seconds per upstream;
the first success after an alert returns a ``Recovery``. The caller emits them (log line,
metric, Sentry event). With one upstream this is exactly the per-provider alert it always
was. Thread-safe; the clock is injected so tests of windows and throttles never sleep;
memory is bounded per upstream.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
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
    model: str | None = None  # a bounded label: a modelMapping target, else "other"


def split_key(key: str) -> tuple[str, str]:
    """``provider/upstream`` (a bare provider name means its only upstream)."""
    provider, _, upstream = key.partition("/")
    return provider, upstream or provider


@dataclass(frozen=True)
class Alert:
    provider: str
    upstream: str
    count: int
    threshold: int
    window_seconds: float
    last_error_type: str
    last_status: int
    sample_request_ids: tuple[str, ...]
    alert_type: str = REPEATED_FAILURES
    models: tuple[str, ...] = ()  # the models of the failed requests in the window


@dataclass(frozen=True)
class Recovery:
    provider: str
    upstream: str
    failures_since_alert: int
    alert_type: str = RECOVERED


@dataclass
class _ProviderState:
    requests: OrderedDict[str, float] = field(default_factory=OrderedDict)  # id -> last failure
    models: dict[str, float] = field(default_factory=dict)  # model -> last failure
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

    def record_failure(self, key: str, failure: Failure) -> Alert | None:
        now = self._clock()
        with self._lock:
            state = self._states.setdefault(key, _ProviderState())
            new = _note(state, failure, now)
            horizon = now - self.window_seconds
            while state.requests and next(iter(state.requests.values())) <= horizon:
                state.requests.popitem(last=False)
            if state.alerting and new:
                state.failures_since_alert += 1
            if len(state.requests) < self.threshold or self._throttled(state, now):
                return None
            state.last_alert_at = now
            state.alerting = True
            state.failures_since_alert = 0
            provider, upstream = split_key(key)
            return Alert(
                provider=provider,
                upstream=upstream,
                count=len(state.requests),
                threshold=self.threshold,
                window_seconds=self.window_seconds,
                last_error_type=failure.error_type,
                last_status=failure.status,
                sample_request_ids=tuple(f.request_id for f in state.recent),
                models=tuple(sorted(m for m, t in state.models.items() if t > horizon)),
            )

    def over_threshold(self, key: str) -> bool:
        """Did the window reach the threshold (whether or not an alert was throttled)?"""
        state = self._states.get(key)
        if state is None:
            return False
        with self._lock:
            horizon = self._clock() - self.window_seconds
            return sum(1 for t in state.requests.values() if t > horizon) >= self.threshold

    def record_success(self, key: str) -> Recovery | None:
        state = self._states.get(key)
        if state is None or not state.alerting:  # the common path takes no lock
            return None
        with self._lock:
            return self._recover(key, state)

    def _recover(self, key: str, state: _ProviderState) -> Recovery | None:
        if not state.alerting:  # another thread recovered it first
            return None
        state.alerting = False
        state.requests.clear()
        state.models.clear()
        return Recovery(*split_key(key), state.failures_since_alert)

    def _throttled(self, state: _ProviderState, now: float) -> bool:
        return state.last_alert_at is not None and now - state.last_alert_at < self.throttle_seconds


def _note(state: _ProviderState, failure: Failure, now: float) -> bool:
    """Note a failure in the window; True when its request had not failed here before."""
    requests = state.requests
    new = failure.request_id not in requests
    if new:
        state.recent.append(failure)
        if len(requests) >= MAX_REMEMBERED_FAILURES:
            requests.popitem(last=False)
    else:
        requests.move_to_end(failure.request_id)  # the window stays in time order
    requests[failure.request_id] = now
    if failure.model is not None:
        state.models[failure.model] = now  # bounded: mapped names and "other"
    return new
