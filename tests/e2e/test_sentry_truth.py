"""What SENTRY.md guarantees, measured against Bugsink through a real ``apirouter serve``:
alerts always arrive; per-request events up to the cap; counts for the rest; and when
Sentry refuses the key, /health and the metrics say so.

The flood test's time budget: 60 s of load plus up to 60 s for Bugsink to take in what was
sent (about 75 s in all on a 2-core machine). It runs in CI with the rest of the e2e suite.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from itertools import count

import httpx
import pytest
from clocks import wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
RATE = 100  # failed requests per second
SECONDS = 60
THROTTLE = "10"  # seconds between alerts per provider: several alerts in one flood


def metrics(router) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The router's own /metrics, as {(sample name, sorted labels): value}."""
    text = httpx.get(router.url + "/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def flood(url: str, rate: int, seconds: int, workers: int = 16) -> dict[int, int]:
    """Send rate*seconds requests, paced at `rate` a second from a pool of clients; return
    how many got each status. Pacing waits for a schedule, never for another thread."""
    start = time.monotonic()
    tickets = count()
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def work() -> None:
        with httpx.Client(timeout=30) as client:
            while (n := next(tickets)) < rate * seconds:
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                status = client.post(url + CHAT, json={"model": "m"}).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def test_flood_every_alert_arrives_and_every_failure_is_sent_or_counted(
    bugsink, start_router, httpserver
):
    dsn, project = bugsink.new_project("apirouter-flood")
    env = {
        "SENTRY_DSN": dsn,
        "APIROUTER_ALERT_THRESHOLD": "5",
        "APIROUTER_ALERT_THROTTLE_SECONDS": THROTTLE,
    }
    router = start_router({"name": "flood", "baseUrl": httpserver.url_for("/v1")}, env)
    httpserver.expect_request(CHAT).respond_with_data(
        '{"error": "overloaded"}', status=503, content_type="application/json"
    )
    began = time.monotonic()
    statuses = flood(router.url, RATE, SECONDS)
    flood_seconds = time.monotonic() - began
    assert statuses == {503: RATE * SECONDS}

    samples = metrics(router)
    failed = total(samples, "apirouter_upstream_errors_total", provider="flood")
    assert failed == RATE * SECONDS  # one failure per request: requests, not retry attempts
    raised = total(
        samples, "apirouter_alerts_total", provider="flood", alert_type="repeated_upstream_failures"
    )
    assert raised >= 1

    def settled():
        """Everything the router sent has arrived: the Bugsink count is what the router
        says it sent (failed - suppressed - dropped events, plus its alerts)."""
        samples = metrics(router)
        suppressed = total(samples, "apirouter_sentry_events_suppressed_total", provider="flood")
        dropped = total(samples, "apirouter_sentry_events_dropped_total")
        arrived = bugsink.event_summaries(project)
        if len(arrived) == failed - suppressed - dropped + raised:
            return samples, suppressed, dropped, arrived
        return None

    samples, suppressed, dropped, arrived = wait_until(settled, timeout=60, interval=1)
    stored = [bugsink.api(f"events/{summary['id']}/") for summary in arrived]
    tags = [event["data"].get("tags", {}) for event in stored]
    errors = [t for t in tags if t.get("error_type", "").startswith("upstream_")]
    alerts = [e for e, t in zip(stored, tags, strict=True) if t.get("alert_type")]
    assert len({event["event_id"] for event in stored}) == len(stored)  # none twice

    # every alert the router raised was received, none missing
    assert len(alerts) == raised
    assert all(e["data"]["tags"]["alert_type"] == "repeated_upstream_failures" for e in alerts)
    # events received + suppressed + dropped == failed requests, exactly
    assert len(errors) + suppressed + dropped == failed
    assert sum(int(t.get("suppressed_since_last", 0)) for t in errors) <= suppressed

    delays = [  # in the order the alerts were raised
        seconds_between(e["timestamp"], e["ingested_at"])
        for e in sorted(alerts, key=lambda e: e["timestamp"])
    ]
    print(
        f"\nflood: {failed:.0f} failed requests in {flood_seconds:.1f}s; "
        f"events received {len(errors)}, suppressed {suppressed:.0f}, dropped {dropped:.0f} "
        f"(by reason: {[(dict(k[1])['reason'], v) for k, v in samples.items() if k[0] == 'apirouter_sentry_events_dropped_total']}); "
        f"alerts raised {raised:.0f}, received {len(alerts)}; "
        f"alert delays after the threshold (s): {[round(d, 3) for d in delays]}; "
        f"test duration {time.monotonic() - began:.1f}s"
    )
    assert max(delays) < 5.0


def test_key_rejected_at_runtime_shows_in_health_and_metrics(bugsink, start_router, httpserver):
    dsn, project = bugsink.new_project("apirouter-rotated")
    router = start_router(
        {"name": "rotated", "baseUrl": httpserver.url_for("/v1")}, {"SENTRY_DSN": dsn}
    )
    httpserver.expect_request(CHAT).respond_with_data("{}", status=503)

    def sentry_health():
        return httpx.get(router.url + "/health", timeout=10).json()["sentry"]

    assert sentry_health() == {"state": "ok", "last_accepted": None}
    httpx.post(router.url + CHAT, json={"model": "m"}, timeout=30)
    accepted = wait_until(lambda: sentry_health()["last_accepted"], timeout=20)

    bugsink.rotate_key(project)  # the operator rotated the key; the router still has the old
    httpx.post(router.url + CHAT, json={"model": "m"}, timeout=30)
    wait_until(lambda: sentry_health()["state"] == "rejected", timeout=20)
    assert sentry_health()["last_accepted"] == accepted
    samples = metrics(router)
    assert total(samples, "apirouter_sentry_events_dropped_total", reason="rejected") == 1
    assert total(samples, "apirouter_sentry_delivery_failures_total", reason="rejected") == 1
    assert total(samples, "apirouter_sentry_last_accepted_timestamp_seconds") == accepted
    assert len(bugsink.event_summaries(project)) == 1
