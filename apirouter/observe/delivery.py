"""Getting events to Sentry, and knowing whether they got there.

Three jobs, each one class:

- ``DeliveryStats``, the watcher of the watcher: the server's last answer (``ok``,
  ``rejected`` for 401/403 and other 4xx, ``rate_limited`` for 429, ``unreachable`` for network
  errors and 5xx), when an envelope was last accepted, failed deliveries and dropped events
  by reason. Alerting goes through Sentry, so a rotated key or an exhausted quota would
  otherwise silence every page without anyone noticing.
- ``AlertSender``: alerts, recovery notices and cron check-ins (the dead man's switch,
  ``monitor.py``) leave on a thread and queue of their own,
  are POSTed at once, retried on network errors and 5xx with backoff, and after
  ``Retry-After`` on 429, within a bound. The SDK's worker has a bounded queue that overflows
  in a flood, and its rate-limit backoff after a 429 would drop the page too (and a lost
  check-in would page "router down" in the middle of an incident).
- ``RouterTransport``: the SDK's own HTTP transport for ordinary events, with two changes:
  envelopes holding an alert or a check-in go to the ``AlertSender``; every error event the
  SDK loses is counted by reason (``queue_full``, ``rate_limited``, ``rejected``,
  ``network``). Deliberate drops (the log-line echoes discarded in ``before_send``,
  sampling, transactions) are not.
  Transactions (opt-in tracing) may fill at most half of the SDK's queue: at a high trace
  sample rate they would otherwise crowd out the error events the queue exists for. Those
  turned away are reported to Sentry as ``queue_overflow`` in the SDK's client reports.

Alerts still pass through the SDK's event processing (scrubbing, ``before_send``, release,
environment): the split happens only at the transport, after the envelope is built.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import sentry_sdk
from sentry_sdk.envelope import Envelope, Item
from sentry_sdk.transport import Transport
from sentry_sdk.utils import Dsn, capture_internal_exceptions

from apirouter.observe.eventcap import EventCap, Group
from apirouter.observe.sentry_internals import HookedTransport

log = logging.getLogger("apirouter.tracking")

REASONS = ("queue_full", "rate_limited", "rejected", "network")
_STATE_FOR_REASON = {
    "rate_limited": "rate_limited",
    "rejected": "rejected",
    "network": "unreachable",
}
STATES = ("ok", *_STATE_FOR_REASON.values())  # the words of /health's sentry state
# the SDK's loss reasons we count, in our words; all others are deliberate or not events
_SDK_REASONS = {"queue_overflow": "queue_full", "ratelimit_backoff": "rate_limited"}
_ALERT_QUEUE_SIZE = 10_000  # alerts are throttled per provider: never near this in practice
_REPORTED = {"sentry_reported": True}  # log extra: never echo this line to Sentry
OnResult = Callable[[str], None]  # hears a delivery's final answer, in /health's words


def failure_reason(status: int | None) -> str | None:
    """What a server answer means for delivery: ``None`` if accepted, else the reason.

    ``None`` as status means no answer at all (a network error)."""
    if status is None or status >= 500:
        return "network"
    if 200 <= status < 300:
        return None
    if status == 429:
        return "rate_limited"
    return "rejected"


def state_for(status: int | None) -> str:
    """The ``/health`` word for one server answer (the same words ``test-alert`` reports)."""
    reason = failure_reason(status)
    return "ok" if reason is None else _STATE_FOR_REASON[reason]


@dataclass(frozen=True)
class DeliveryReport:
    """A consistent snapshot for ``/health`` and ``/metrics``."""

    state: str
    last_accepted: float | None
    failures: dict[str, int]
    dropped: dict[str, int]
    suppressed: dict[Group, int]
    answered_at: float | None = None  # Unix time of the server's last answer (or none)

    def health(self) -> dict[str, Any]:
        return {"state": self.state, "last_accepted": self.last_accepted}


class DeliveryStats:
    """The last answer from the Sentry server and the counts behind the metrics."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._state = "ok"
        self._last_accepted: float | None = None
        self._answered_at: float | None = None
        self._failures: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()

    def accepted(self) -> None:
        with self._lock:
            self._state = "ok"
            self._last_accepted = self._answered_at = self._wall_clock()

    def failed(self, reason: str) -> None:
        """One delivery that did not happen; the server's answer (if any) sets the state."""
        with self._lock:
            self._failures[reason] += 1
            if reason in _STATE_FOR_REASON:
                self._state = _STATE_FOR_REASON[reason]
                self._answered_at = self._wall_clock()

    def dropped(self, reason: str, count: int = 1) -> None:
        """Events lost for good (never on top of a count the SDK reports itself)."""
        if count > 0:
            with self._lock:
                self._dropped[reason] += count

    def report(self, suppressed: dict[Group, int]) -> DeliveryReport:
        with self._lock:
            return DeliveryReport(
                self._state,
                self._last_accepted,
                {r: self._failures[r] for r in REASONS},
                {r: self._dropped[r] for r in REASONS},
                suppressed,
                self._answered_at,
            )


@dataclass(frozen=True)
class RetryPolicy:
    """How hard an alert is pushed through before it is counted as dropped."""

    give_up_after: float = 300.0  # seconds after it was queued
    first_backoff: float = 0.5  # after a network error or 5xx, doubling...
    max_backoff: float = 30.0  # ...up to this
    max_retry_after: float = 60.0  # a longer Retry-After is cut to this (then asked again)
    timeout: float = 10.0  # per POST


@dataclass
class Delivery:
    """The long-lived delivery state of one SDK client: stats, the event cap, the policy."""

    stats: DeliveryStats
    cap: EventCap
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Callable[[], float] = time.monotonic
    # check-in id -> who wants its result (the monitor that sent it)
    _check_ins: dict[str, OnResult] = field(default_factory=dict)
    _check_ins_lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self) -> DeliveryReport:
        return self.stats.report(self.cap.suppressed())

    def expect_check_in(self, check_in_id: str, on_result: OnResult) -> None:
        """Before sending a check-in: call ``on_result`` with Sentry's answer to it."""
        with self._check_ins_lock:
            self._check_ins[check_in_id] = on_result

    def check_in_listener(self, check_in_id: str | None) -> OnResult | None:
        with self._check_ins_lock:
            return self._check_ins.pop(check_in_id or "", None)

    def transport_class(self) -> type[Transport]:
        """A transport class bound to this delivery (the SDK builds it from its options)."""
        delivery = self

        class BoundRouterTransport(RouterTransport):
            def __init__(self, options: dict[str, Any]) -> None:
                super().__init__(options, delivery)

        return BoundRouterTransport


def current() -> Delivery | None:
    """The active SDK client's delivery state, if it uses our transport."""
    transport = sentry_sdk.get_client().transport
    return getattr(transport, "delivery", None)


def current_report() -> DeliveryReport | None:
    delivery = current()
    return delivery.report() if delivery is not None else None


class AlertSender:
    """Alerts, recovery notices and check-ins, POSTed by a thread of their own, retried
    within a bound; ``on_result`` hears the final answer (``/health``'s words)."""

    def __init__(
        self,
        dsn: Dsn,
        stats: DeliveryStats,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        auth = dsn.to_auth(f"apirouter-alerts/{sentry_sdk.VERSION}")
        self._url = auth.get_api_url()
        self._headers = {
            "X-Sentry-Auth": auth.to_header(),
            "Content-Type": "application/x-sentry-envelope",
        }
        self._stats = stats
        self._retry = retry
        self._clock = clock
        self._queue: queue.Queue[tuple[float, bytes, OnResult | None]] = queue.Queue(
            _ALERT_QUEUE_SIZE
        )
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._client = httpx.Client(timeout=retry.timeout, follow_redirects=False)

    def submit(self, envelope: Envelope, on_result: OnResult | None = None) -> None:
        try:
            self._queue.put_nowait((self._clock(), envelope.serialize(), on_result))
        except queue.Full:
            self._give_up("queue_full", "the alert queue is full")
            if on_result is not None:
                on_result("unreachable")
            return
        self._ensure_thread()

    def pending(self) -> int:
        """Alerts queued or being delivered."""
        return self._queue.unfinished_tasks

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # wakes the thread to exit
                self._queue.put_nowait(None)  # type: ignore[arg-type]
        self._client.close()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="apirouter-alert-sender", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None or self._stopping.is_set():
                    return
                queued_at, body, on_result = job
                with capture_internal_exceptions():
                    state = self._deliver(queued_at, body)
                    if on_result is not None and state is not None:
                        on_result(state)
            finally:
                self._queue.task_done()

    def _deliver(self, queued_at: float, body: bytes) -> str | None:
        """POST until accepted, rejected, or past the give-up bound; the final answer in
        ``/health``'s words (``None``: shutting down)."""
        backoff = self._retry.first_backoff
        while True:
            status, retry_after = self._post(body)
            reason = failure_reason(status)
            if reason is None:
                self._stats.accepted()
                return "ok"
            self._stats.failed(reason)
            if reason == "rejected":
                break
            if reason == "rate_limited":
                delay = min(retry_after or self._retry.max_retry_after, self._retry.max_retry_after)
            else:
                delay, backoff = backoff, min(backoff * 2, self._retry.max_backoff)
            if self._clock() + delay - queued_at > self._retry.give_up_after:
                break
            if self._stopping.wait(delay):
                return None  # shutting down: the transport's kill() counted it as pending
        self._give_up(reason, f"the last answer was {status or 'a network error'}")
        return state_for(status)

    def _post(self, body: bytes) -> tuple[int | None, float | None]:
        try:
            response = self._client.post(self._url, content=body, headers=self._headers)
        except httpx.HTTPError:
            return None, None
        return response.status_code, _retry_after(response.headers)

    def _give_up(self, reason: str, why: str) -> None:
        self._stats.dropped(reason)
        log.error("an alert was not delivered to Sentry (%s): %s", reason, why, extra=_REPORTED)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from ``Retry-After`` or Sentry's ``X-Sentry-Rate-Limits``."""
    values = [headers.get("retry-after"), (headers.get("x-sentry-rate-limits") or "").split(":")[0]]
    for value in values:
        try:
            seconds = float(value or "")
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def _is_alert(envelope: Envelope) -> bool:
    event = envelope.get_event()
    return event is not None and "alert_type" in (event.get("tags") or {})


def _check_in(envelope: Envelope) -> dict[str, Any] | None:
    for item in envelope.items:
        if item.type == "check_in" and item.payload.json is not None:
            payload: dict[str, Any] = item.payload.json
            return payload
    return None


def _events_in(envelope: Envelope | None) -> int:
    if envelope is None:
        return 0
    return sum(1 for item in envelope.items if item.data_category == "error")


def _is_transaction(envelope: Envelope) -> bool:
    return any(item.data_category == "transaction" for item in envelope.items)


class RouterTransport(HookedTransport):
    """The SDK's HTTP transport, with alerts on their own path and every lost event counted."""

    def __init__(self, options: dict[str, Any], delivery: Delivery) -> None:
        super().__init__(options)
        self.delivery = delivery
        assert self.parsed_dsn is not None
        self._alerts = AlertSender(self.parsed_dsn, delivery.stats, delivery.retry, delivery.clock)
        self._queued = 0  # error events handed to the SDK's worker and not yet done
        self._queued_transactions = 0  # transaction envelopes, likewise
        self._transaction_room = max(1, int(options["transport_queue_size"]) // 2)
        self._queued_lock = threading.Lock()

    # --- routing ------------------------------------------------------------------------

    def capture_envelope(self, envelope: Envelope) -> None:
        if _is_alert(envelope):
            self._alerts.submit(envelope)
            return
        check_in = _check_in(envelope)
        if check_in is not None:
            listener = self.delivery.check_in_listener(check_in.get("check_in_id"))
            self._alerts.submit(envelope, listener)
            return
        events = _events_in(envelope)
        traced = 0 if events else int(_is_transaction(envelope))
        if not self._count_queued(events, traced):
            self._overflowed(envelope)  # a transaction, with half the queue already theirs
            return

        def send() -> None:
            try:
                with capture_internal_exceptions():
                    self.send_now(envelope)
            finally:
                self._count_queued(-events, -traced)

        if not self.submit(send):
            self._count_queued(-events, -traced)
            self._overflowed(envelope)

    def _count_queued(self, events: int, transactions: int = 0) -> bool:
        """Count envelopes in and out of the worker's queue; ``False`` (and nothing
        counted) for a transaction beyond its share of the queue."""
        with self._queued_lock:
            if transactions > 0 and self._queued_transactions >= self._transaction_room:
                return False
            self._queued += events
            self._queued_transactions += transactions
            return True

    def _overflowed(self, envelope: Envelope) -> None:
        self.on_dropped_event("full_queue")
        for item in envelope.items:
            self.record_lost_event("queue_overflow", item=item)

    # --- counting -----------------------------------------------------------------------

    def record_lost_event(
        self,
        reason: str,
        data_category: Any = None,
        item: Item | None = None,
        *,
        quantity: int = 1,
    ) -> None:
        super().record_lost_event(reason, data_category, item, quantity=quantity)
        ours = _SDK_REASONS.get(reason)
        category = item.data_category if item is not None else data_category
        if ours is not None and category == "error":
            self.delivery.stats.failed(ours)
            self.delivery.stats.dropped(ours, quantity if item is None else 1)

    def handle_response(self, response: Any, envelope: Envelope | None) -> None:
        reason = failure_reason(response.status)
        if reason is None:
            self.delivery.stats.accepted()
        else:  # the SDK counts these as network_error, or (429) not at all
            self.delivery.stats.failed(reason)
            self.delivery.stats.dropped(reason, _events_in(envelope))
        super().handle_response(response, envelope)

    def send_request(
        self, body: bytes, headers: dict[str, str], endpoint_type: Any, envelope: Envelope | None
    ) -> None:
        try:
            super().send_request(body, headers, endpoint_type, envelope)
        except Exception:
            self.delivery.stats.failed("network")
            self.delivery.stats.dropped("network", _events_in(envelope))
            raise

    # --- flushing and shutdown ----------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(error events still queued in the SDK's worker, alerts not yet delivered)."""
        with self._queued_lock:
            return self._queued, self._alerts.pending()

    def flush(self, timeout: float, callback: Any = None) -> None:
        deadline = time.monotonic() + timeout
        self._alerts.flush(timeout)
        super().flush(max(0.0, deadline - time.monotonic()), callback)

    def kill(self) -> None:
        """Called after the final flush: whatever is still pending is lost; count and say so."""
        events, alerts = self.pending()
        if events or alerts:
            self.delivery.stats.dropped("queue_full", events + alerts)
            log.warning(
                "shutting down with %d Sentry event(s) and %d alert(s) not delivered",
                events,
                alerts,
            )
        self._alerts.close()
        super().kill()
