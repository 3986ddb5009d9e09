"""Fleet mode: several apirouter processes sharing one real redis-server.

Three ``apirouter serve`` processes on three ports: one limit for the whole fleet, one
alert and one recovery at the wire (the local Sentry ingest), Redis stopped or frozen
mid-load without a single unanswered request, and a TTL on every key after 10,000 client
keys. In-process tests first: ``/health``, the metric and the outage events of one app.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from clocks import wait_until
from harness import RedisServer, free_port, write_config
from prometheus_client.parser import text_string_to_metric_families
from sentry_wire import Ingest

from apirouter.observe.tracking import REDIS_RECOVERED, REDIS_UNAVAILABLE
from apirouter.state.alerting import RECOVERED, REPEATED_FAILURES

CHAT = "/v1/chat/completions"
COMPLETION = {"id": "c", "object": "chat.completion", "choices": []}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def events_of(ingest: Ingest, alert_type: str) -> list[dict[str, Any]]:
    return [e for e in ingest.events if (e.get("tags") or {}).get("alert_type") == alert_type]


# --- one app, in process ----------------------------------------------------------------------


def test_health_and_metrics_follow_redis(make_router, redis_url, redis_server, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    router = make_router(redis_url=redis_url, redis_prefix="hm:")
    assert httpx.get(router.url + "/health").json()["redis"] == {"state": "up", "errors": 0}
    redis_server.stop()
    assert httpx.post(router.v1 + "/chat/completions", json=BODY).status_code == 200
    health = httpx.get(router.url + "/health").json()
    assert health["redis"]["state"] == "down" and health["status"] == "ok"
    assert router.sample("apirouter_redis_errors_total", {"operation": "rate_limit"}) == 0
    assert router.sample("apirouter_redis_errors_total", {"operation": "record_success"}) == 1
    assert router.sample("apirouter_redis_up") == 0
    redis_server.start()
    wait_until(lambda: httpx.get(router.url + "/health").json()["redis"]["state"] == "up")
    assert router.sample("apirouter_redis_up") == 1


def test_without_redis_health_says_off(router):
    assert httpx.get(router.url + "/health").json()["redis"] == {"state": "off"}
    assert "apirouter_redis_up" not in httpx.get(router.url + "/metrics").text


def test_an_outage_logs_once_and_sends_one_event_then_a_recovery(
    make_router, redis_url, redis_server, httpserver, sentry, ingest, log_lines
):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    settings = sentry()
    router = make_router(
        tracking_enabled=True,
        sentry_dsn=settings.sentry_dsn,
        redis_url=redis_url,
        rate_limit_rpm=600,
        rate_limit_burst=100,
    )
    redis_server.stop()
    for _ in range(20):
        assert httpx.post(router.v1 + "/chat/completions", json=BODY).status_code == 200
    redis_server.start()
    wait_until(lambda: httpx.get(router.url + "/health").json()["redis"]["state"] == "up")
    ingest.wait_for_events(2)
    assert len(events_of(ingest, REDIS_UNAVAILABLE)) == 1
    assert len(events_of(ingest, REDIS_RECOVERED)) == 1
    unavailable = events_of(ingest, REDIS_UNAVAILABLE)[0]
    assert unavailable["level"] == "error" and "ConnectionError" in str(unavailable["contexts"])
    assert sum("Redis unavailable" in line for line in log_lines) == 1
    assert sum("Redis available again" in line for line in log_lines) == 1


# --- three `apirouter serve` processes ----------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    log: Path


@pytest.fixture
def fleet(tmp_path: Path, httpserver, redis_url) -> Iterator[Callable[..., list[Served]]]:
    """Start N ``apirouter serve`` processes sharing the test's Redis; stopped by pid."""
    started: list[Served] = []

    def start(env: dict[str, str], count: int = 3) -> list[Served]:
        config = write_config(
            tmp_path / "fleet.json", {"name": "fleetprov", "baseUrl": httpserver.url_for("/v1")}
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "APIROUTER_"))}
        base.update({"APIROUTER_REDIS_URL": redis_url, "APIROUTER_REDIS_PREFIX": "fleet:"})
        processes = []
        for n in range(count):
            log = tmp_path / f"serve-{len(started) + n}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "apirouter",
                        "serve",
                        "--config",
                        str(config),
                        "--port",
                        "0",
                        "--threads",
                        "8",
                    ],
                    env={**base, **env},
                    cwd=tmp_path,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                )
            processes.append((process, log))
        for process, log in processes:
            line = wait_until(lambda p=process, log=log: _listening(p, log), timeout=30)
            started.append(Served(process, line.split("listening on ")[1].strip(), log))
        return started[-count:]

    yield start
    stop(started)


def _listening(process: subprocess.Popen, log: Path) -> str | None:
    text = log.read_text(errors="replace")
    if process.poll() is not None:
        raise AssertionError(f"apirouter serve exited: {text}")
    return next((line for line in text.splitlines() if "listening on" in line), None)


def stop(served: list[Served]) -> None:
    """SIGTERM by pid: the graceful shutdown flushes Sentry, so counts are final after."""
    for s in served:
        if s.process.poll() is None:
            s.process.send_signal(signal.SIGTERM)
    for s in served:
        try:
            s.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            s.process.kill()
            s.process.wait()


def post(client: httpx.Client, served: Served, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return client.post(served.url + CHAT, json=BODY, headers=headers).status_code


def test_one_limit_for_the_whole_fleet(fleet, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    routers = fleet({"RATE_LIMIT_REQUESTS_PER_MINUTE": "1", "RATE_LIMIT_BURST": "5"})
    with httpx.Client() as client:
        statuses = [post(client, routers[n % 3], "sk-fleet-key-1") for n in range(12)]
        assert statuses == [200] * 5 + [429] * 7
        retry_after = client.post(
            routers[0].url + CHAT, json=BODY, headers={"Authorization": "Bearer sk-fleet-key-1"}
        ).headers["Retry-After"]
        assert 1 <= int(retry_after) <= 60
        # another key has its own bucket
        assert post(client, routers[1], "sk-fleet-key-2") == 200


def test_failures_round_robin_raise_exactly_one_alert_and_one_recovery(fleet, httpserver, ingest):
    httpserver.expect_request(CHAT).respond_with_data("down", status=503)
    routers = fleet({"APIROUTER_ALERT_THRESHOLD": "5", "SENTRY_DSN": ingest.dsn})
    with httpx.Client() as client:
        assert [post(client, routers[n % 3], "k") for n in range(6)] == [503] * 6
        wait_until(lambda: events_of(ingest, REPEATED_FAILURES), timeout=10)
        httpserver.clear()
        httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
        assert [post(client, r, "k") for r in routers] == [200] * 3
    wait_until(lambda: events_of(ingest, RECOVERED), timeout=10)
    stop(routers)  # flushes every process's Sentry queue: the counts below are final
    alerts = events_of(ingest, REPEATED_FAILURES)
    assert len(alerts) == 1, alerts
    assert alerts[0]["contexts"]["alert"]["count"] == 5
    assert len(events_of(ingest, RECOVERED)) == 1
    assert alerts[0]["contexts"]["alert"]["threshold"] == 5


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_redis_outage_mid_load_every_request_answered(
    fleet, httpserver, ingest, redis_server: RedisServer, outage
):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    env = {"RATE_LIMIT_REQUESTS_PER_MINUTE": "1", "RATE_LIMIT_BURST": "5"}
    routers = fleet({**env, "SENTRY_DSN": ingest.dsn})
    statuses: list[int | str] = []
    progress = threading.Semaphore(0)

    def load(served: Served) -> None:
        with httpx.Client(timeout=5) as client:
            for n in range(30):
                try:
                    statuses.append(post(client, served, f"sk-load-{n % 10}"))
                except httpx.HTTPError as exc:  # would be a failure: recorded, asserted
                    statuses.append(type(exc).__name__)
                progress.release()

    workers = [threading.Thread(target=load, args=(r,)) for r in routers]
    for worker in workers:
        worker.start()
    for _ in range(15):
        progress.acquire(timeout=30)  # a third of the load is through: Redis goes away
    if outage == "stopped":
        redis_server.stop()
    else:
        redis_server.freeze()
    for worker in workers:
        worker.join(timeout=60)
    assert len(statuses) == 90
    assert set(statuses) <= {200, 429}, statuses  # answered, on local limits if need be
    with httpx.Client() as client:  # every process meets the outage
        for served in routers:
            assert post(client, served, "sk-during") in (200, 429)
    wait_until(lambda: len(events_of(ingest, REDIS_UNAVAILABLE)) >= 3, timeout=15)
    for served in routers:
        assert httpx.get(served.url + "/health").json()["redis"]["state"] == "down"

    if outage == "stopped":
        redis_server.start()
    else:
        redis_server.thaw()
    for served in routers:
        wait_until(
            lambda s=served: httpx.get(s.url + "/health").json()["redis"]["state"] == "up",
            timeout=10,
            interval=0.2,
        )
    with httpx.Client() as client:  # shared again: one bucket for the fleet
        statuses_after = [post(client, routers[n % 3], "sk-after-outage") for n in range(9)]
    assert statuses_after == [200] * 5 + [429] * 4
    stop(routers)
    pids = {r.process.pid for r in routers}
    unavailable = events_of(ingest, REDIS_UNAVAILABLE)
    assert sorted(e["contexts"]["redis"]["pid"] for e in unavailable) == sorted(pids)
    recovered = events_of(ingest, REDIS_RECOVERED)
    assert sorted(e["contexts"]["redis"]["pid"] for e in recovered) == sorted(pids)


def test_every_key_has_a_ttl_after_ten_thousand_client_keys(
    fleet, httpserver, redis_server: RedisServer
):
    httpserver.expect_request(CHAT).respond_with_data("down", status=503)
    # 1/min: a used bucket lives 61 s, so all 10,000 are still there to be inspected
    routers = fleet({"RATE_LIMIT_REQUESTS_PER_MINUTE": "1", "RATE_LIMIT_BURST": "5"})
    answered: list[int] = []

    def clients(first: int) -> None:
        with httpx.Client() as client:
            for n in range(first, 10_000, 4):
                # a body that is not JSON: the bucket is taken first, then 400, no upstream
                response = client.post(
                    routers[n % 3].url + CHAT,
                    content=b"{",
                    headers={
                        "Authorization": f"Bearer sk-many-{n}",
                        "Content-Type": "application/json",
                    },
                )
                answered.append(response.status_code)

    workers = [threading.Thread(target=clients, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answered.count(400) == 10_000
    with httpx.Client() as client:  # and a failure window
        assert post(client, routers[0], "sk-window") == 503
    store = redis_server.client()
    keys = list(store.scan_iter(match="fleet:*", count=5000))
    assert len(keys) == 10_001 + 3  # one bucket per client key, three for the window
    pipe = store.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = pipe.execute()
    assert min(ttls) > 0  # -1 would be a key without a TTL
    assert all(key.startswith(b"fleet:v1:") for key in keys)


# --- gunicorn: four workers, one server -------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True])
def test_gunicorn_four_workers_share_limits_alerts_and_metrics(
    tmp_path, httpserver, ingest, redis_url, preload
):
    """The README's command: gunicorn -w 4 --threads 32 apirouter.wsgi:application.

    With --preload the app is built before the fork: Sentry must still work in workers."""
    httpserver.expect_request(CHAT).respond_with_data("down", status=503)
    config = write_config(
        tmp_path / "p.json", {"name": "gprov", "baseUrl": httpserver.url_for("/v1")}
    )
    (tmp_path / "metrics").mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "APIROUTER_"))}
    env.update(
        {
            "API_ROUTER_CONFIG_PATH": str(config),
            "APIROUTER_REDIS_URL": redis_url,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
            "SENTRY_DSN": ingest.dsn,
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "1",
            "RATE_LIMIT_BURST": "5",
        }
    )
    command = ["-w", "4", "--threads", "32", "apirouter.wsgi:application"]
    command += ["--bind", f"127.0.0.1:{port}", "--no-control-socket"]
    command += ["--preload"] if preload else []
    log = (tmp_path / "gunicorn.log").open("wb")
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *command], env=env, cwd=tmp_path, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url + "/health"), timeout=30, interval=0.1)
        statuses: list[int] = []

        def client(key: str) -> None:
            for _ in range(3):  # a new connection each time: any worker may answer
                with httpx.Client() as c:
                    statuses.append(post(c, Served(gunicorn, url, Path()), key))

        workers = [threading.Thread(target=client, args=("sk-g",)) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert sorted(statuses) == [429] * 19 + [503] * 5  # one bucket: burst 5, fleet-wide
        pids = {p.name.rsplit("_", 1)[1] for p in (tmp_path / "metrics").glob("counter_*.db")}
        assert len(pids) >= 2  # several workers answered...
        metrics = httpx.get(url + "/metrics").text
        chat = {"route": CHAT, "method": "POST"}
        assert sample(metrics, "apirouter_requests_total", {**chat, "status": "429"}) == 19
        assert sample(metrics, "apirouter_requests_total", {**chat, "status": "503"}) == 5
        alert = {"alert_type": REPEATED_FAILURES, "provider": "gprov"}
        assert sample(metrics, "apirouter_alerts_total", alert) == 1
        assert sample(metrics, "apirouter_requests_in_flight", {}) == 1  # this scrape
        wait_until(lambda: events_of(ingest, REPEATED_FAILURES), timeout=10)
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(timeout=30)
        log.close()
    assert len(events_of(ingest, REPEATED_FAILURES)) == 1  # Sentry works after the fork


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    """One sample's value from a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_redis_password_never_leaves(make_router, httpserver, sentry, ingest, log_lines):
    secret = "redis-SECRET-pw-0123456789"
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    settings = sentry()
    router = make_router(
        tracking_enabled=True,
        sentry_dsn=settings.sentry_dsn,
        redis_url=f"redis://:{secret}@127.0.0.1:{free_port()}/0",  # nothing listens there
        rate_limit_rpm=60,
        rate_limit_burst=10,
    )
    assert httpx.post(router.v1 + "/chat/completions", json=BODY).status_code == 200
    health = httpx.get(router.url + "/health").text
    metrics = httpx.get(router.url + "/metrics").text
    ingest.wait_for_events(1)
    assert events_of(ingest, REDIS_UNAVAILABLE)
    assert secret.encode() not in ingest.raw_bytes()
    assert all(secret not in text for text in [health, metrics, *log_lines])
