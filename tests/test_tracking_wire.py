"""Sentry at the wire: the real SDK sends real envelopes to a local ingest endpoint, and
these tests decode them."""

from __future__ import annotations

import logging
import os
import sys
import threading

import httpx
import sentry_sdk
from clocks import wait_until
from harness import SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY
from sentry_wire import DSN_SECRET
from werkzeug import Request, Response

from apirouter.observe.keys import anonymize
from apirouter.ops.firedrill import refused_base_url
from apirouter.upstream.client import Upstream

CHAT = "/v1/chat/completions"


def post(router, path=CHAT, key=SECRET_CLIENT_KEY, request_id=None, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    return httpx.post(router.url + path, json={"model": "m"}, headers=headers, timeout=10, **kwargs)


def assert_request_tags(event, *, request_id, error_type, status, provider="testprov", route=CHAT):
    tags = event["tags"]
    assert tags["request_id"] == request_id
    assert tags["route"] == route
    assert tags["method"] == "POST"
    assert tags["provider"] == provider
    assert tags["error_type"] == error_type
    assert tags["status_code"] == str(status)
    assert tags["client_key"] == anonymize(SECRET_CLIENT_KEY)
    assert "alert_type" not in tags


def test_upstream_connect_failure_is_one_event_with_context(sentry, make_router, ingest, log_lines):
    settings = sentry()
    router = make_router(
        {"baseUrl": refused_base_url()},
        tracking_enabled=True,
        sentry_dsn=settings.sentry_dsn,
        default_api_key=SECRET_DEFAULT_KEY,
    )
    response = post(router, path=CHAT + "?secret_param=1", request_id="req-connect")
    assert response.status_code == 502
    [event] = ingest.wait_for_events(1)
    assert_request_tags(
        event, request_id="req-connect", error_type="upstream_connect_error", status=502
    )
    assert event["level"] == "error"
    assert event["tags"]["upstream_host"] == "127.0.0.1"
    assert event["exception"]["values"][0]["type"] == "UpstreamConnectError"
    assert event["fingerprint"] == ["upstream_connect_error", "testprov", CHAT]
    upstream = event["contexts"]["upstream"]
    assert upstream["url"].endswith("/v1/chat/completions")  # no query string
    assert upstream["status"] is None
    assert event["environment"] == "production"
    assert event["release"].startswith("apirouter@")
    assert "request" not in event  # no headers or bodies attached
    assert not sentry_sdk.get_client().should_send_default_pii()
    tracking_flush_and_assert_no_secrets(ingest, log_lines)


def tracking_flush_and_assert_no_secrets(ingest, log_lines):
    raw = ingest.raw_bytes() + "\n".join(log_lines).encode()
    for secret in (SECRET_CLIENT_KEY, SECRET_DEFAULT_KEY, DSN_SECRET):
        assert secret.encode() not in raw, secret


def test_upstream_503_and_timeout_events(sentry, make_router, httpserver, ingest):
    sentry()
    router = make_router(tracking_enabled=True, read_timeout=0.2)
    release = threading.Event()

    def upstream(request: Request) -> Response:
        if request.headers.get("X-Request-ID") == "req-timeout":
            release.wait(5)
        return Response('{"error": "overloaded"}', status=503, content_type="application/json")

    httpserver.expect_request(CHAT).respond_with_handler(upstream)
    assert post(router, request_id="req-503").status_code == 503
    assert post(router, request_id="req-timeout").status_code == 504
    release.set()
    events = {e["tags"]["request_id"]: e for e in ingest.wait_for_events(2)}
    assert_request_tags(
        events["req-503"], request_id="req-503", error_type="upstream_5xx", status=503
    )
    assert events["req-503"]["contexts"]["upstream"]["status"] == 503
    assert events["req-503"]["contexts"]["upstream"]["latency_seconds"] > 0
    assert_request_tags(
        events["req-timeout"], request_id="req-timeout", error_type="upstream_timeout", status=504
    )
    assert len(ingest.events) == 2  # once each, the ERROR access log lines were not re-sent


def test_unhandled_exception_is_captured_with_its_traceback(sentry, tmp_path, ingest):
    from apirouter.config.provider import load
    from apirouter.proxy.app import App

    class ExplodingTransport(httpx.BaseTransport):
        def handle_request(self, request):
            raise ZeroDivisionError("bug in a handler")

    settings = sentry()
    app = App(
        load("generic"),
        settings,
        tracking_enabled=True,
        upstream=Upstream(1, 1, transport=ExplodingTransport()),
    )
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://router")
    response = client.post(
        CHAT,
        json={"model": "m"},
        headers={"X-Request-ID": "req-bug", "Authorization": f"Bearer {SECRET_CLIENT_KEY}"},
    )
    assert response.status_code == 500
    assert "Traceback" not in response.text and "ZeroDivisionError" not in response.text
    assert response.json()["error"]["code"] == "internal_error"
    [event] = ingest.wait_for_events(1)
    assert_request_tags(
        event, request_id="req-bug", error_type="internal_error", status=500, provider="generic"
    )
    assert "fingerprint" not in event  # grouped by stack trace: different bugs stay apart
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "ZeroDivisionError"
    frames = exception["stacktrace"]["frames"]
    assert frames and all("vars" not in frame for frame in frames)  # no local variables


def test_config_reload_error_is_reported_once(sentry, make_router, ingest):
    sentry()
    router = make_router(tracking_enabled=True)
    router.config_path.write_text('{"baseUrl": 42}')
    os.utime(router.config_path, ns=(9, 9_000_000_000))
    router.app.store.reload_if_changed()
    [event] = ingest.wait_for_events(1)
    assert event["tags"]["error_type"] == "config_error"
    assert event["tags"]["provider"] == "testprov"
    assert event["level"] == "error"
    assert (
        "$.baseUrl: must be a non-empty string, not a number"
        in event["contexts"]["config"]["problems"]
    )
    assert len(ingest.events) == 1  # the ERROR log line was not sent a second time


def test_error_logs_reach_sentry(sentry, ingest):
    sentry()
    logging.getLogger("apirouter.something").error("disk full while writing %s", "x")
    [event] = ingest.wait_for_events(1)
    assert event["level"] == "error"
    assert event["logentry"]["message"] == "disk full while writing %s"
    logging.getLogger("apirouter.something").warning("not an event")
    ingest.wait_for_events(1)
    assert len(ingest.events) == 1


def test_client_errors_are_not_events_unless_asked(sentry, make_router, ingest, httpserver):
    sentry()
    router = make_router(tracking_enabled=True)
    httpserver.expect_request(CHAT).respond_with_json({"error": "nope"}, status=400)
    assert httpx.post(router.url + CHAT, content=b"{bad").status_code == 415
    assert post(router).status_code == 400  # the upstream's 4xx is the client's business
    sentry_sdk.flush()
    assert ingest.events == []

    router = make_router(tracking_enabled=True, sentry_client_errors=True)
    assert (
        httpx.post(
            router.url + CHAT, content=b"{bad", headers={"Content-Type": "application/json"}
        ).status_code
        == 400
    )
    [event] = ingest.wait_for_events(1)
    assert event["level"] == "info"
    assert event["tags"]["error_type"] == "invalid_json"


def test_concurrent_requests_keep_their_own_tags(sentry, make_router, httpserver, ingest):
    sentry()
    router_a = make_router({"name": "prov-a"}, tracking_enabled=True)
    router_b = make_router({"name": "prov-b"}, tracking_enabled=True)
    both_arrived = threading.Barrier(2, timeout=5)

    def upstream(request: Request) -> Response:
        both_arrived.wait()  # the two requests are in flight at the same time
        return Response("{}", status=502, content_type="application/json")

    httpserver.expect_request(CHAT).respond_with_handler(upstream)
    httpserver.expect_request("/v1/embeddings").respond_with_handler(upstream)
    results = {}

    def call(name, router, path, key):
        results[name] = post(router, path=path, key=key, request_id=f"req-{name}").status_code

    threads = [
        threading.Thread(target=call, args=("a", router_a, CHAT, "key-aaaaaaaaaaaaaaaa")),
        threading.Thread(
            target=call, args=("b", router_b, "/v1/embeddings", "key-bbbbbbbbbbbbbbbb")
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": 502, "b": 502}
    events = {e["tags"]["request_id"]: e["tags"] for e in ingest.wait_for_events(2)}
    assert events["req-a"]["provider"] == "prov-a"
    assert events["req-a"]["route"] == CHAT
    assert events["req-a"]["client_key"] == anonymize("key-aaaaaaaaaaaaaaaa")
    assert events["req-b"]["provider"] == "prov-b"
    assert events["req-b"]["route"] == "/v1/embeddings"
    assert events["req-b"]["client_key"] == anonymize("key-bbbbbbbbbbbbbbbb")
    # and nothing was left behind on the shared scopes
    assert sentry_sdk.get_global_scope()._tags == {}
    assert sentry_sdk.get_isolation_scope()._tags == {}


def alert_events(ingest):
    return [e for e in ingest.events if "alert_type" in e.get("tags", {})]


def test_alert_is_emitted_three_ways_once_and_not_sampled(
    sentry, make_router, httpserver, ingest, log_lines
):
    sentry(sentry_sample_rate=0.0)
    no_retries = {"retry": {"maxAttempts": 1}}  # one request, one failure in the window
    router = make_router(
        no_retries, tracking_enabled=True, sentry_sample_rate=0.0, alert_threshold=3
    )
    httpserver.expect_request(CHAT).respond_with_json({"error": "down"}, status=503)
    for n in range(5):
        post(router, request_id=f"req-{n}")
    alerts = wait_until(lambda: (sentry_sdk.flush(), alert_events(ingest))[1])
    [alert] = alerts
    assert len(ingest.events) == 1  # sample rate 0 dropped the five error events, not the alert
    assert alert["level"] == "error"
    assert alert["tags"] == {
        "alert_type": "repeated_upstream_failures",
        "provider": "testprov",
        "upstream": "127.0.0.1",  # one upstream, named after its host
        "models": "other",  # models of the failed requests; unmapped names are "other"
    }
    assert alert["fingerprint"] == [
        "apirouter-alert",
        "repeated_upstream_failures",
        "testprov",
        "127.0.0.1",
    ]
    facts = alert["contexts"]["alert"]
    assert facts["count"] == 3 and facts["threshold"] == 3 and facts["window_seconds"] == 300
    assert facts["last_error_type"] == "upstream_5xx" and facts["last_status"] == 503
    assert facts["sample_request_ids"] == ["req-0", "req-1", "req-2"]
    assert facts["models"] == ["other"]
    assert "3 failed requests" in alert["message"] and "models: other" in alert["message"]
    labels = {"provider": "testprov", "alert_type": "repeated_upstream_failures"}
    assert router.sample("apirouter_alerts_total", labels) == 1
    assert len([line for line in log_lines if "repeated upstream failures" in line]) == 1


def test_event_after_an_alert_has_no_alert_tag_and_recovery_arrives(
    sentry, make_router, httpserver, ingest
):
    sentry()
    router = make_router({"retry": {"maxAttempts": 1}}, tracking_enabled=True, alert_threshold=2)
    state = {"status": 503}
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: Response("{}", status=state["status"], content_type="application/json")
    )
    post(router, request_id="before-1")
    post(router, request_id="before-2")
    post(router, request_id="after")
    events = ingest.wait_for_events(4)
    after = next(e for e in events if e.get("tags", {}).get("request_id") == "after")
    assert "alert_type" not in after["tags"]
    assert after["tags"]["error_type"] == "upstream_5xx"
    state["status"] = 200
    post(router, request_id="ok")
    events = ingest.wait_for_events(5)
    recovery = next(e for e in events if e["tags"].get("alert_type") == "upstream_recovered")
    assert recovery["level"] == "info"
    assert recovery["tags"]["provider"] == "testprov"
    assert recovery["contexts"]["recovery"]["failures_since_alert"] == 1


def test_scrubber_removes_secrets_from_any_event(sentry, ingest):
    sentry()
    with sentry_sdk.isolation_scope() as scope:
        scope.set_context(
            "leaky",
            {
                "headers": {
                    "Authorization": f"Bearer {SECRET_CLIENT_KEY}",
                    "x-api-key": SECRET_DEFAULT_KEY,
                    "cookie": "session=abc",
                },
                "nested": [{"api_key": "k1"}],
                "note": f"Bearer {SECRET_CLIENT_KEY}",
            },
        )
        sentry_sdk.capture_message("leaky")
    [event] = ingest.wait_for_events(1)
    leaky = event["contexts"]["leaky"]
    assert leaky["headers"] == {
        "Authorization": "[Filtered]",
        "x-api-key": "[Filtered]",
        "cookie": "[Filtered]",
    }
    assert leaky["nested"] == [{"api_key": "[Filtered]"}]
    assert leaky["note"] == "[Filtered]"
    assert SECRET_CLIENT_KEY.encode() not in ingest.raw_bytes()


def test_no_outbound_trace_headers(sentry, make_router, httpserver, ingest):
    sentry()
    router = make_router(tracking_enabled=True)
    seen = []
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: (seen.append(dict(request.headers)), Response("{}"))[1]
    )
    post(router)
    assert "Sentry-Trace" not in seen[0] and "Baggage" not in seen[0]


def test_disabled_means_no_client_and_no_socket(make_router, httpserver):
    assert not sentry_sdk.get_client().is_active()
    connections: list[tuple] = []
    recording = [True]

    def audit(event, args):
        if event == "socket.connect" and recording[0]:
            connections.append(args[1])

    sys.addaudithook(audit)
    router = make_router({"baseUrl": refused_base_url()})  # failures galore, still no Sentry
    for _ in range(6):
        post(router)
    recording[0] = False
    assert not sentry_sdk.get_client().is_active()
    router_port = int(router.url.rsplit(":", 1)[1])
    upstream_port = int(router.app.store.current.base_url.split(":")[2].split("/")[0])
    assert connections
    assert {address[1] for address in connections} <= {router_port, upstream_port}
    assert (
        router.sample(
            "apirouter_alerts_total",
            {"provider": "testprov", "alert_type": "repeated_upstream_failures"},
        )
        == 1
    )
