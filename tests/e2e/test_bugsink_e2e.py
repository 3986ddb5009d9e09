"""End to end against Bugsink, a real Sentry-protocol server: what operators will see.

A failing integration makes these fail: tags set on a shared scope would give events the
wrong request_id; alerts subject to sampling would never arrive at SENTRY_SAMPLE_RATE=0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from clocks import wait_until
from harness import doc_blocks, run_bash
from werkzeug import Request, Response

from apirouter.observe.keys import anonymize
from apirouter.ops.firedrill import refused_base_url

pytestmark = pytest.mark.e2e


def poll(fetch, timeout: float = 20.0):
    """Poll Bugsink's API until fetch() returns something truthy (events are sent async)."""
    return wait_until(fetch, timeout=timeout, interval=0.1)


CLIENT_KEY = "sk-e2e-client-SECRET-abcdefghijklmnopqrstuvwxyz"
DEFAULT_KEY = "sk-e2e-default-SECRET-zyxwvutsrqponmlkjihgfedcba"


def events_where(bugsink, **tags):
    return [
        e
        for e in bugsink.all_events()
        if all(e["data"].get("tags", {}).get(k) == v for k, v in tags.items())
    ]


def call(router, request_id, key=CLIENT_KEY):
    response = httpx.post(
        router.url + "/v1/chat/completions",
        json={"model": "m"},
        timeout=30,
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
    )
    assert response.headers["X-Request-ID"] == request_id
    return response


def test_each_upstream_failure_is_one_tagged_event_without_secrets(
    bugsink, start_router, httpserver
):
    dsn_secret = bugsink.dsn.split("//")[1].split("@")[0]
    env = {
        "SENTRY_DSN": bugsink.dsn,
        "DEFAULT_API_KEY": DEFAULT_KEY,
        "APIROUTER_READ_TIMEOUT_SECONDS": "0.5",
    }
    broken = start_router({"name": "e2e-refused", "baseUrl": refused_base_url()}, env)
    flaky = start_router({"name": "e2e-flaky", "baseUrl": httpserver.url_for("/v1")}, env)
    release = threading.Event()

    def upstream(request: Request) -> Response:
        if request.headers["X-Request-ID"] == "e2e-timeout":
            release.wait(10)
        return Response('{"error": "overloaded"}', status=503, content_type="application/json")

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(upstream)
    assert call(broken, "e2e-connect").status_code == 502
    assert call(flaky, "e2e-503").status_code == 503
    assert call(flaky, "e2e-timeout").status_code == 504
    release.set()

    expected = {
        "e2e-connect": ("e2e-refused", "upstream_connect_error", "502"),
        "e2e-503": ("e2e-flaky", "upstream_5xx", "503"),
        "e2e-timeout": ("e2e-flaky", "upstream_timeout", "504"),
    }
    for request_id, (provider, error_type, status) in expected.items():
        [event] = poll(lambda rid=request_id: events_where(bugsink, request_id=rid))
        tags = event["data"]["tags"]
        assert tags["route"] == "/v1/chat/completions"
        assert tags["method"] == "POST"
        assert tags["provider"] == provider
        assert tags["error_type"] == error_type
        assert tags["status_code"] == status
        assert tags["client_key"] == anonymize(CLIENT_KEY)
        assert "alert_type" not in tags
        stored = json.dumps(event)
        for secret in (CLIENT_KEY, DEFAULT_KEY, dsn_secret):
            assert secret not in stored


def test_alert_once_despite_sampling_grouped_into_one_issue_then_recovery(
    bugsink, start_router, httpserver
):
    env = {
        "SENTRY_DSN": bugsink.dsn,
        "SENTRY_SAMPLE_RATE": "0",
        "APIROUTER_ALERT_THRESHOLD": "3",
        "APIROUTER_ALERT_THROTTLE_SECONDS": "0.01",
    }
    config = {
        "name": "e2e-alerts",
        "baseUrl": httpserver.url_for("/v1"),
        "retry": {"maxAttempts": 1},  # one request, one failure in the window
    }
    router = start_router(config, env)
    state = {"status": 503}
    httpserver.expect_request("/v1/chat/completions").respond_with_handler(
        lambda request: Response("{}", status=state["status"], content_type="application/json")
    )

    for n in range(3):
        call(router, f"alert-a{n}")
    [first] = poll(
        lambda: events_where(
            bugsink, alert_type="repeated_upstream_failures", provider="e2e-alerts"
        )
    )
    facts = first["data"]["contexts"]["alert"]
    assert facts["count"] == 3 and facts["threshold"] == 3
    assert facts["last_error_type"] == "upstream_5xx" and facts["last_status"] == 503
    assert facts["sample_request_ids"] == ["alert-a0", "alert-a1", "alert-a2"]
    assert first["data"]["level"] == "error"

    state["status"] = 200
    call(router, "alert-ok")
    poll(lambda: events_where(bugsink, alert_type="upstream_recovered", provider="e2e-alerts"))

    state["status"] = 503
    for n in range(3):
        call(router, f"alert-b{n}")

    def alerts():
        return events_where(bugsink, alert_type="repeated_upstream_failures", provider="e2e-alerts")

    poll(lambda: len(alerts()) == 2)
    two_alerts = alerts()
    assert len({e["issue"] for e in two_alerts}) == 1  # both alerts grouped into one issue
    sampled_out = [
        e
        for e in bugsink.all_events()
        if e["data"].get("tags", {}).get("provider") == "e2e-alerts"
        and "error_type" in e["data"]["tags"]
    ]
    assert sampled_out == []  # SENTRY_SAMPLE_RATE=0 dropped every error event, no alert


def test_test_alert_command_against_bugsink(bugsink):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "apirouter",
            "test-alert",
            "--dsn",
            bugsink.dsn,
            "--provider",
            "e2e-drill",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    [alert] = poll(
        lambda: events_where(
            bugsink, alert_type="repeated_upstream_failures", provider="e2e-drill-test-alert"
        )
    )
    assert alert["data"]["tags"]["synthetic"] == "true"

    key = bugsink.dsn.split("//")[1].split("@")[0]
    altered = bugsink.dsn.replace(key, "0" * len(key))
    rejected = subprocess.run(
        [sys.executable, "-m", "apirouter", "test-alert", "--dsn", altered],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rejected.returncode == 1
    assert "rejected (HTTP 403)" in rejected.stdout
    assert "refused the DSN's key" in rejected.stdout


def test_sentry_md_verify_procedure_as_written(bugsink, tmp_path):
    blocks = doc_blocks(Path(__file__).parents[2] / "SENTRY.md", "bash verify")
    assert len(blocks) == 2
    env = {**os.environ, "SENTRY_DSN": bugsink.dsn}
    for block in blocks:
        result = run_bash(block, tmp_path, env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('"code": "upstream_connect_error"') == 3  # as SENTRY.md says

    # what SENTRY.md says arrives: the drill ...
    poll(lambda: events_where(bugsink, test_alert="dsn-check", provider="qwen-test-alert"))
    poll(
        lambda: events_where(
            bugsink,
            alert_type="repeated_upstream_failures",
            provider="qwen-test-alert",
            synthetic="true",
        )
    )
    # ... and the by-hand run: three connect errors, then one alert with count 3
    [alert] = poll(
        lambda: events_where(
            bugsink, alert_type="repeated_upstream_failures", provider="verify-broken"
        )
    )
    assert alert["data"]["contexts"]["alert"]["count"] == 3

    def connect_errors():
        return events_where(bugsink, provider="verify-broken", error_type="upstream_connect_error")

    poll(lambda: len(connect_errors()) == 3)


def test_a_fleet_of_three_raises_one_alert_and_one_recovery(
    bugsink, start_router, httpserver, redis_url
):
    """Three routers sharing a real Redis; 6 failures round-robin at threshold 5: one
    alert in Bugsink, not three and not zero, and one recovery afterwards."""
    env = {
        "SENTRY_DSN": bugsink.dsn,
        "APIROUTER_REDIS_URL": redis_url,
        "APIROUTER_REDIS_PREFIX": "e2e-fleet:",
        "APIROUTER_ALERT_THRESHOLD": "5",
    }
    config = {"name": "e2e-fleet", "baseUrl": httpserver.url_for("/v1")}
    routers = [start_router(config, env) for _ in range(3)]
    httpserver.expect_request("/v1/chat/completions").respond_with_data("down", status=503)
    for n in range(6):
        assert call(routers[n % 3], f"e2e-fleet-{n}").status_code == 503
    alert = {"alert_type": "repeated_upstream_failures", "provider": "e2e-fleet"}
    poll(lambda: events_where(bugsink, **alert))
    httpserver.clear()
    httpserver.expect_request("/v1/chat/completions").respond_with_json({"choices": []})
    for n, router in enumerate(routers):
        assert call(router, f"e2e-fleet-ok-{n}").status_code == 200
    recovered = {"alert_type": "upstream_recovered", "provider": "e2e-fleet"}
    poll(lambda: events_where(bugsink, **recovered))
    for router in routers:  # a graceful stop flushes Sentry: the counts below are final
        router.process.terminate()
        router.process.wait(timeout=20)
    assert len(events_where(bugsink, **alert)) == 1
    assert len(events_where(bugsink, **recovered)) == 1
