"""The dead man's switch (APIROUTER_SENTRY_MONITOR): cron check-ins at the wire, at start-up
and once per interval, through a failure flood; Sentry's answer in /health; one check-in per
interval for a fleet on one Redis, and every replica's /health showing its result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
from clocks import wait_until
from harness import Router
from pytest_httpserver import HTTPServer
from sentry_wire import Ingest

from apirouter.config.settings import Settings, SettingsError
from apirouter.state.checkins import CheckInResult, LocalCheckIns
from apirouter.state.redis_backend import Keys, RedisCheckIns, RedisLink, client

SLUG = "apirouter-test"
CHAT = "/v1/chat/completions"
HOUR = 3600.0  # an interval no test outlives: only the start-up check-in is sent by itself
DAY = 86400.0  # the fleet tests: replicas started together share one interval (numbered from 0:00 UTC)


def health(router: Router) -> dict:
    return httpx.get(router.url + "/health").json()["sentry"]


def monitored(make_router: Callable[..., Router], sentry, interval: float, **settings) -> Router:
    dsn = sentry().sentry_dsn
    return make_router(
        tracking_enabled=True,
        sentry_dsn=dsn,
        sentry_monitor=SLUG,
        sentry_monitor_interval=interval,
        **settings,
    )


def test_one_check_in_at_start_up_with_the_monitor_config(make_router, sentry, ingest: Ingest):
    router = monitored(make_router, sentry, HOUR)
    [check_in] = wait_until(ingest.check_ins)
    assert check_in["monitor_slug"] == SLUG and check_in["status"] == "ok"
    assert check_in["monitor_config"] == {
        "schedule": {"type": "interval", "value": 60, "unit": "minute"},
        "checkin_margin": 60,
        "failure_issue_threshold": 1,
        "recovery_threshold": 1,
    }
    wait_until(lambda: health(router)["monitor"]["last_check_in"])
    sentry_health = health(router)
    assert sentry_health["state"] == "ok" and sentry_health["last_accepted"] is not None
    assert sentry_health["monitor"]["slug"] == SLUG
    assert sentry_health["monitor"]["last_check_in"]["state"] == "ok"
    assert len(ingest.check_ins()) == 1


def test_a_check_in_every_interval(make_router, sentry, ingest: Ingest):
    monitored(make_router, sentry, 0.1)
    check_ins = wait_until(lambda: len(ingest.check_ins()) >= 4 and ingest.check_ins())
    assert len({c["check_in_id"] for c in check_ins}) == len(check_ins)
    assert ingest.events == []  # check-ins only: no error events


def test_a_rejected_check_in_turns_health_rejected(make_router, sentry, ingest: Ingest):
    """A rotated key on an idle router: the next check-in says so."""
    ingest.status = 401
    router = monitored(make_router, sentry, 0.1)
    wait_until(lambda: health(router)["monitor"]["last_check_in"])
    assert health(router)["state"] == "rejected"
    assert health(router)["monitor"]["last_check_in"]["state"] == "rejected"
    assert router.sample("apirouter_sentry_state", {"state": "rejected"}) == 1
    ingest.status = 200
    wait_until(lambda: health(router)["state"] == "ok")


def test_check_ins_arrive_during_a_failure_flood(
    make_router, sentry, ingest: Ingest, httpserver: HTTPServer
):
    """100 failing requests a second: the per-request events are capped and queued on the
    SDK's worker; the check-ins still leave on the alert path, one per interval."""
    httpserver.expect_request(CHAT).respond_with_json({"error": "down"}, status=503)
    router = monitored(
        make_router, sentry, 0.1, sentry_events_per_minute=1000, alert_threshold=10**6
    )
    wait_until(ingest.check_ins)
    stop = threading.Event()
    answered: list[int] = []

    def flood() -> None:  # 4 clients, 25 requests a second each
        with httpx.Client() as http:
            while not stop.is_set():
                started = time.monotonic()
                answered.append(
                    http.post(router.v1 + "/chat/completions", json={"model": "m"}).status_code
                )
                stop.wait(max(0.0, 0.04 - (time.monotonic() - started)))

    clients = [threading.Thread(target=flood) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 20)
        # five check-ins in a row, each with flood requests answered since the one before
        for _ in range(5):
            check_ins, requests = len(ingest.check_ins()), len(answered)
            wait_until(lambda c=check_ins: len(ingest.check_ins()) > c, timeout=10)
            wait_until(lambda r=requests: len(answered) > r, timeout=10)
    finally:
        stop.set()
        for thread in clients:
            thread.join(10)
    assert set(answered) == {503}
    assert all(c["status"] == "ok" for c in ingest.check_ins())
    assert ingest.wait_for_events(1)  # the flood's own events went to Sentry too


def test_monitor_without_dsn_is_a_configuration_error():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"APIROUTER_SENTRY_MONITOR": SLUG})
    assert caught.value.problems[0][0] == "APIROUTER_SENTRY_MONITOR"
    with pytest.raises(SettingsError):
        Settings.from_env({"APIROUTER_SENTRY_MONITOR": "Not A Slug", "SENTRY_DSN": "http://k@h/1"})
    settings = Settings.from_env(
        {
            "APIROUTER_SENTRY_MONITOR": SLUG,
            "SENTRY_DSN": "http://k@h/1",
            "APIROUTER_SENTRY_MONITOR_INTERVAL_MINUTES": "5",
        }
    )
    assert settings.sentry_monitor == SLUG and settings.sentry_monitor_interval == 300


# --- a fleet on one Redis -----------------------------------------------------------------------


def fleet(make_router, sentry, redis_url: str) -> list[Router]:
    """Three replicas on one Redis, each past its start-up check-in (or its claim of it)."""
    dsn = sentry().sentry_dsn
    routers = [
        make_router(
            tracking_enabled=True,
            sentry_dsn=dsn,
            sentry_monitor=SLUG,
            sentry_monitor_interval=DAY,
            redis_url=redis_url,
        )
        for _ in range(3)
    ]
    wait_until(lambda: all(r.app.reporter.monitor.ticks for r in routers))
    return routers


def next_interval(redis_server) -> None:
    """What the passing of an interval means to the fleet: its claim is gone."""
    redis = redis_server.client()
    for key in redis.scan_iter("apirouter:v1:mon:*:interval:*"):
        redis.delete(key)


def tick_together(routers: list[Router]) -> list[bool]:
    sent: list[bool] = []
    threads = [
        threading.Thread(target=lambda r=r: sent.append(r.app.reporter.monitor.tick()))
        for r in routers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return sent


def test_a_fleet_sends_one_check_in_per_interval(
    make_router, sentry, ingest: Ingest, redis_url, redis_server
):
    routers = fleet(make_router, sentry, redis_url)
    wait_until(ingest.check_ins)  # start-up: three replicas, one check-in
    for _ in range(3):
        next_interval(redis_server)
        assert sorted(tick_together(routers)) == [False, False, True]
    wait_until(lambda: len(ingest.check_ins()) >= 4)
    assert len(ingest.check_ins()) == 4
    assert tick_together(routers) == [False, False, False]  # the same interval again

    # Sentry rejects the key: the one sender's answer reaches every replica's /health
    ingest.status = 401
    next_interval(redis_server)
    assert sorted(tick_together(routers)) == [False, False, True]
    for router in routers:
        wait_until(lambda r=router: health(r)["state"] == "rejected")
        assert health(router)["monitor"]["last_check_in"]["state"] == "rejected"


def test_while_redis_is_down_every_replica_sends_its_own(
    make_router, sentry, ingest: Ingest, redis_url, redis_server
):
    routers = fleet(make_router, sentry, redis_url)
    wait_until(ingest.check_ins)
    redis_server.stop()
    assert tick_together(routers) == [True, True, True]
    wait_until(lambda: len(ingest.check_ins()) == 4)


def test_the_senders_result_is_shared_for_two_intervals(redis_url, redis_server):
    """Three links to one Redis: what one records, the others read, until 2 intervals pass."""

    def replica() -> RedisCheckIns:
        link = RedisLink(client(redis_url, 200), events=_NoEvents())
        return RedisCheckIns(link, Keys("t:"), SLUG, LocalCheckIns())

    sender, *others = [replica() for _ in range(3)]
    assert [r.latest() for r in others] == [None, None]
    sender.record(CheckInResult("rejected", 1000.0), interval=0.05)
    assert [r.latest() for r in others] == [CheckInResult("rejected", 1000.0)] * 2
    wait_until(lambda: all(r.latest() is None for r in others))


class _NoEvents:
    def error(self, operation: str) -> None: ...

    def down(self, reason: str) -> None: ...

    def up(self, outage_seconds: float) -> None: ...
