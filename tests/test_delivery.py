"""Sentry under pressure, at the wire: the per-group cap, the alert path that floods and
rate limits cannot hold back, lost events counted by reason, and the server's last answer
in /health and /metrics. The real SDK sends real envelopes to a local ingest endpoint."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
import sentry_sdk
from clocks import FakeClock, wait_until
from harness import SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY
from sentry_wire import DSN_SECRET, Envelope, decode_envelope

from apirouter.config.settings import Settings
from apirouter.observe import delivery, tracking
from apirouter.observe.delivery import RetryPolicy
from apirouter.observe.eventcap import EventCap
from apirouter.state.alerting import Alert, Recovery

CHAT = "/v1/chat/completions"
FAST_RETRY = RetryPolicy(give_up_after=5.0, first_backoff=0.05, max_backoff=0.2)


@pytest.fixture
def tracked() -> Iterator[Callable[..., Settings]]:
    """Enable the SDK with our transport, an injectable clock and retry policy."""

    def enable(dsn: str, clock: Callable[[], float] = time.monotonic, **overrides: Any) -> Settings:
        retry = overrides.pop("retry", FAST_RETRY)
        settings = Settings.defaults(sentry_dsn=dsn, **overrides)
        assert tracking.init(settings, retry=retry, clock=clock)
        return settings

    yield enable
    tracking.shutdown(timeout=2)


def post(router, request_id: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {SECRET_CLIENT_KEY}"}
    if request_id:
        headers["X-Request-ID"] = request_id
    return httpx.post(router.url + CHAT, json={"model": "m"}, headers=headers, timeout=10)


def refused_dsn() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://public@127.0.0.1:{probe.getsockname()[1]}/1"


def an_alert(provider: str = "testprov") -> Alert:
    return Alert(provider, "main", 5, 5, 300.0, "upstream_5xx", 503, ("r1", "r2"))


def report() -> delivery.DeliveryReport:
    current = delivery.current_report()
    assert current is not None
    return current


def is_alert(envelope: Envelope) -> bool:
    return any("alert_type" in (e.get("tags") or {}) for e in envelope.events)


def failing_upstream(httpserver) -> None:
    httpserver.expect_request(CHAT).respond_with_json({"error": "down"}, status=503)


# --- the cap ------------------------------------------------------------------------------


def test_event_cap_admits_per_minute_per_group_and_counts_the_rest():
    clock = FakeClock()
    cap = EventCap(2, clock)
    assert [cap.admit("p", "upstream_5xx") for _ in range(5)] == [0, 0, None, None, None]
    assert cap.admit("p", "upstream_timeout") == 0  # another group has its own budget
    clock.now = 59.9
    assert cap.admit("p", "upstream_5xx") is None
    clock.now = 60.0  # a new window: the next event carries the count held back before it
    assert cap.admit("p", "upstream_5xx") == 4
    assert cap.admit("p", "upstream_5xx") == 0
    assert cap.suppressed() == {("p", "upstream_5xx"): 4, ("p", "upstream_timeout"): 0}


def test_capped_events_are_counted_and_reported_on_the_next_event(
    tracked, make_router, httpserver, ingest
):
    clock = FakeClock()
    tracked(ingest.dsn, clock, sentry_events_per_minute=3)
    router = make_router(tracking_enabled=True, alert_threshold=1000)
    failing_upstream(httpserver)
    for n in range(7):
        assert post(router, f"req-{n}").status_code == 503
    ingest.wait_for_events(3)
    labels = {"provider": "testprov", "error_type": "upstream_5xx"}
    assert router.sample("apirouter_sentry_events_suppressed_total", labels) == 4
    clock.now = 60.0
    post(router, "req-next")
    events = ingest.wait_for_events(4)
    assert [e["tags"]["request_id"] for e in events] == ["req-0", "req-1", "req-2", "req-next"]
    assert "suppressed_since_last" not in events[0]["tags"]
    assert events[3]["tags"]["suppressed_since_last"] == "4"
    assert report().dropped == dict.fromkeys(delivery.REASONS, 0)


# --- the alert path -----------------------------------------------------------------------


def test_alert_is_delivered_while_ordinary_events_are_rate_limited(
    tracked, make_router, httpserver, ingest, log_lines
):
    """The SDK backs off for 60 s after a 429 and drops what comes meanwhile: counted as
    rate_limited; the alert, on its own path, is delivered at once all the same."""
    tracked(ingest.dsn, default_api_key=SECRET_DEFAULT_KEY)
    ingest.answer = lambda envelope: (200, None) if is_alert(envelope) else (429, "60")
    router = make_router(
        tracking_enabled=True, alert_threshold=3, default_api_key=SECRET_DEFAULT_KEY
    )
    failing_upstream(httpserver)
    post(router, "first")
    wait_until(lambda: report().dropped["rate_limited"] == 1)  # the 429 answer itself
    post(router, "second")
    post(router, "third")  # raises the alert
    [alert] = wait_until(ingest.alerts)
    assert alert["tags"]["alert_type"] == "repeated_upstream_failures"
    tracking.flush()
    wait_until(lambda: report().dropped["rate_limited"] == 3)  # two dropped during backoff
    ordinary = [e for e in ingest.envelopes if not is_alert(e)]
    assert len(ordinary) == 1  # the SDK sent nothing else while backing off
    assert router.sample("apirouter_sentry_events_dropped_total", {"reason": "rate_limited"}) == 3
    assert (
        router.sample("apirouter_sentry_delivery_failures_total", {"reason": "rate_limited"}) == 3
    )
    raw = ingest.raw_bytes() + "\n".join(log_lines).encode()
    for secret in (SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY, DSN_SECRET):
        assert secret.encode() not in raw, secret


def test_alert_answered_429_is_retried_after_retry_after(tracked, ingest):
    answers = iter([(429, "1")])
    ingest.answer = lambda envelope: next(answers, (200, None))
    tracked(ingest.dsn, retry=RetryPolicy(give_up_after=30))
    tracking.capture_alert(an_alert())
    wait_until(lambda: len(ingest.envelopes) == 2, timeout=10)
    wait_until(lambda: report().state == "ok")  # the sender has read the second answer
    assert ingest.received_at[1] - ingest.received_at[0] >= 1.0  # waited as told
    assert ingest.envelopes[0].events == ingest.envelopes[1].events  # the same alert again
    current = report()
    assert current.state == "ok" and current.last_accepted is not None
    assert current.failures["rate_limited"] == 1
    assert current.dropped == dict.fromkeys(delivery.REASONS, 0)  # retried, not lost


def test_a_long_retry_after_is_cut_to_the_bound(tracked, ingest):
    answers = iter([(429, "3600")])
    ingest.answer = lambda envelope: next(answers, (200, None))
    tracked(ingest.dsn, retry=RetryPolicy(max_retry_after=0.2))
    tracking.capture_recovery(Recovery("testprov", "main", 3))
    wait_until(lambda: len(ingest.envelopes) == 2)
    assert ingest.envelopes[1].events[0]["tags"]["alert_type"] == "upstream_recovered"
    wait_until(lambda: report().state == "ok")  # the sender has read the last answer


def test_alert_given_up_after_the_bound_is_counted_and_logged(tracked, ingest, log_lines):
    ingest.status = 503
    tracked(ingest.dsn, retry=RetryPolicy(give_up_after=0.3, first_backoff=0.05))
    tracking.capture_alert(an_alert())
    wait_until(lambda: report().dropped["network"] == 1)
    assert report().state == "unreachable"
    assert report().failures["network"] == len(ingest.envelopes) >= 2
    assert any("an alert was not delivered to Sentry (network)" in line for line in log_lines)


class _Recorder(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_alert_is_retried_after_a_network_error(tracked, make_router):
    """The port is bound but not listening (connections refused) until the first attempt
    failed; then a server starts listening on it and the retry is delivered."""
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    tracked(f"http://public@127.0.0.1:{port}/1")
    router = make_router(tracking_enabled=True)
    tracking.capture_alert(an_alert())
    wait_until(lambda: report().failures["network"] >= 1)
    assert httpx.get(router.url + "/health").json()["sentry"]["state"] == "unreachable"

    server = ThreadingHTTPServer(("127.0.0.1", port), _Recorder, bind_and_activate=False)
    server.socket.close()
    server.socket = port_holder
    server.server_activate()
    _Recorder.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        [body] = wait_until(lambda: _Recorder.bodies)
    finally:
        server.shutdown()
        server.server_close()
    [event] = decode_envelope(body, None).events
    assert event["tags"]["alert_type"] == "repeated_upstream_failures"
    health = httpx.get(router.url + "/health").json()["sentry"]
    assert health["state"] == "ok" and health["last_accepted"] is not None
    assert report().dropped == dict.fromkeys(delivery.REASONS, 0)


# --- lost events counted by reason, and what /health says ------------------------------------


@pytest.mark.parametrize(
    ("status", "state", "reason"),
    [
        (401, "rejected", "rejected"),
        (403, "rejected", "rejected"),
        (429, "rate_limited", "rate_limited"),
    ],
)
def test_health_and_metrics_tell_the_servers_answer(
    tracked, make_router, httpserver, ingest, status, state, reason
):
    tracked(ingest.dsn)
    router = make_router(tracking_enabled=True)
    assert httpx.get(router.url + "/health").json()["sentry"] == {
        "state": "ok",
        "last_accepted": None,
    }
    ingest.status = status
    failing_upstream(httpserver)
    post(router)
    wait_until(lambda: report().dropped[reason] == 1)
    assert httpx.get(router.url + "/health").json()["sentry"] == {
        "state": state,
        "last_accepted": None,
    }
    assert router.sample("apirouter_sentry_delivery_failures_total", {"reason": reason}) == 1
    assert router.sample("apirouter_sentry_last_accepted_timestamp_seconds") == 0
    # apirouter_sentry_state says the same as /health (the "alert path broken" rule reads it)
    assert router.sample("apirouter_sentry_state", {"state": state}) == 1
    assert router.sample("apirouter_sentry_state", {"state": "ok"}) == 0

    ingest.status = 200
    if status == 429:  # the SDK keeps backing off; the alert path does not
        tracking.capture_alert(an_alert())
    else:
        post(router)
    wait_until(lambda: report().state == "ok")
    health = httpx.get(router.url + "/health").json()["sentry"]
    assert abs(health["last_accepted"] - time.time()) < 30
    assert router.sample("apirouter_sentry_last_accepted_timestamp_seconds") == pytest.approx(
        health["last_accepted"]
    )


def test_unreachable_sentry_is_counted_as_network(tracked, make_router, httpserver):
    tracked(refused_dsn())
    router = make_router(tracking_enabled=True)
    failing_upstream(httpserver)
    post(router)
    wait_until(lambda: report().dropped["network"] == 1)
    assert httpx.get(router.url + "/health").json()["sentry"]["state"] == "unreachable"
    assert router.sample("apirouter_sentry_events_dropped_total", {"reason": "network"}) == 1


def test_deliberate_drops_are_not_counted(tracked, ingest):
    """The log-line echo of a failure already captured, discarded in before_send, and
    sampling are the router's choices, not losses."""
    tracked(ingest.dsn, sentry_sample_rate=0.0)
    logging.getLogger("apirouter.app").error("echo", extra=tracking.ALREADY_CAPTURED)
    sentry_sdk.capture_message("sampled away")
    tracking.capture_alert(an_alert())  # never sampled
    wait_until(ingest.alerts)
    tracking.flush()
    assert len(ingest.events) == 1
    assert report().dropped == dict.fromkeys(delivery.REASONS, 0)


def test_queue_overflow_is_counted_exactly(tracked, ingest):
    """The SDK's queue holds 1,000 envelopes; with its worker held up, the rest overflow.
    Events received plus events counted as dropped is every event captured."""
    release = threading.Event()

    def slow(envelope: Envelope) -> tuple[int, str | None]:
        release.wait(10)
        return 200, None

    ingest.answer = slow
    tracked(ingest.dsn)
    captured = 1010
    for n in range(captured):
        sentry_sdk.capture_message(f"event {n}")
    assert report().dropped["queue_full"] >= 9
    release.set()
    tracking.flush(timeout=30)
    wait_until(lambda: len(ingest.events) + report().dropped["queue_full"] == captured, 30)


def test_events_pending_at_shutdown_are_counted_and_logged(tracked, ingest, log_lines):
    release = threading.Event()
    ingest.answer = lambda envelope: (release.wait(10), (200, None))[1]
    tracked(ingest.dsn)
    current = delivery.current()
    for n in range(5):
        sentry_sdk.capture_message(f"event {n}")
    tracking.capture_alert(an_alert())
    tracking.shutdown(timeout=0.2)
    release.set()
    dropped = current.report().dropped["queue_full"]
    assert 5 <= dropped <= 6  # one event may already be on the wire when time runs out
    assert any("not delivered" in line and "shutting down" in line for line in log_lines)
    # in a test the process lives on: let the SDK's worker drain, so no event leaks into the
    # next test's ingest
    wait_until(lambda: len(ingest.events) == 6)


def test_alert_envelope_is_plain_json_without_secrets(tracked, ingest):
    tracked(ingest.dsn)
    with sentry_sdk.isolation_scope() as scope:
        scope.set_context("leaky", {"authorization": f"Bearer {SECRET_CLIENT_KEY}"})
        tracking.capture_alert(an_alert())
    [alert] = wait_until(ingest.alerts)
    assert alert["environment"] == "production"  # the SDK's processing ran
    assert alert["release"].startswith("apirouter@")
    assert SECRET_CLIENT_KEY.encode() not in ingest.raw_bytes()
    assert DSN_SECRET.encode() not in ingest.raw_bytes()
    assert json.loads(ingest.envelopes[0].raw.split(b"\n")[0])["event_id"] == alert["event_id"]
