"""The Redis state backend against a real redis-server: shared buckets and windows, one
alert and one recovery for several processes, TTLs on every key, and outages (stopped,
frozen) answered from local state."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from clocks import FakeClock, run_concurrently

from apirouter.config.provider import RateLimit
from apirouter.config.settings import Settings, SettingsError
from apirouter.state.alerting import Failure, FailureTracker
from apirouter.state.ratelimit import RateLimiter
from apirouter.state.redis_backend import (
    Keys,
    RedisFailureTracker,
    RedisLink,
    RedisRateLimiter,
    client,
    ping,
)

PREFIX = "test:"


class Events:
    """Records what the link reports (the RedisEvents interface)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.downs: list[str] = []
        self.ups: list[float] = []

    def error(self, operation: str) -> None:
        self.errors.append(operation)

    def down(self, reason: str) -> None:
        self.downs.append(reason)

    def up(self, outage_seconds: float) -> None:
        self.ups.append(outage_seconds)


class Process:
    """What one apirouter process holds: its own client, link, limiter and tracker."""

    def __init__(self, url: str, wall: FakeClock | None = None, timeout_ms: int = 50) -> None:
        self.events = Events()
        self.monotonic = FakeClock(1000.0)
        self.link = RedisLink(client(url, timeout_ms), self.events, clock=self.monotonic)
        keys = Keys(PREFIX)
        self.local_limiter = RateLimiter(clock=self.monotonic)
        self.limiter = RedisRateLimiter(self.link, keys, self.local_limiter, clock=wall)
        local_tracker = FailureTracker(5, 300, 60, clock=self.monotonic)
        self.tracker = RedisFailureTracker(
            self.link, keys, local_tracker, clock=wall, monotonic=self.monotonic
        )

    def fail(self, key: str = "prov/main", request_id: str | None = None):
        """One failed request (a new one unless ``request_id`` is given), for model fast."""
        request_id = request_id or f"r{next(_request_numbers)}"
        return self.tracker.record_failure(
            key, Failure("upstream_5xx", 503, request_id, model="fast")
        )


_request_numbers = itertools.count()


def keys_under(redis_server, prefix: str = PREFIX) -> list[bytes]:
    return list(redis_server.client().scan_iter(match=prefix + "*", count=1000))


# --- token buckets ----------------------------------------------------------------------------


def test_bucket_semantics_match_the_local_limiter(redis_url):
    wall = FakeClock(1_700_000_000.0)
    process = Process(redis_url, wall)
    limit = RateLimit(requests_per_minute=30, burst=2)
    key = ("/v1/chat/completions", "sk-...abc")
    assert [process.limiter.acquire(key, limit) for _ in range(3)] == [None, None, 2]
    wall.now += 1.0
    assert process.limiter.acquire(key, limit) == 1  # half a token so far
    wall.now += 1.0
    assert process.limiter.acquire(key, limit) is None
    assert process.events.errors == []
    assert len(process.local_limiter) == 0  # decided in Redis, not locally


def test_processes_share_one_bucket(redis_url):
    processes = [Process(redis_url) for _ in range(3)]  # Redis's own clock
    limit = RateLimit(requests_per_minute=1, burst=5)
    answers = [processes[i % 3].limiter.acquire(("/r", "k"), limit) for i in range(9)]
    assert answers[:5] == [None] * 5
    assert all(isinstance(wait, int) and 1 <= wait <= 60 for wait in answers[5:])


def test_concurrent_acquires_never_overspend(redis_url):
    processes = [Process(redis_url) for _ in range(2)]
    limit = RateLimit(requests_per_minute=1, burst=50)
    allowed: list[bool] = []

    def worker() -> None:
        for n in range(10):
            allowed.append(processes[n % 2].limiter.acquire(("/r", "k"), limit) is None)

    run_concurrently(worker, 16)
    assert sum(allowed) == 50


def test_every_key_is_prefixed_versioned_hash_tagged_and_expires(redis_url, redis_server):
    process = Process(redis_url)
    limit = RateLimit(requests_per_minute=6, burst=3)
    process.limiter.acquire(("/v1/models/{model}", "key{with}braces"), limit)
    process.fail("prov/main")
    process.fail("weird {key} name/with spaces")
    found = keys_under(redis_server)
    assert len(found) == 1 + 3 + 3  # a bucket; failed requests, recent ids, models (twice)
    for key in found:
        text = key.decode()
        assert text.startswith(PREFIX + "v1:")
        tag = text[text.index("{") + 1 : text.index("}")]
        assert tag and "{" not in tag  # the first braces are the hash tag
        assert redis_server.client().pttl(key) > 0, text
    # a bucket lives until it would have refilled: 1 token used at 6/min = 10 s, plus 1 s
    bucket = next(k for k in found if b":rl:" in k)
    assert 10_000 < redis_server.client().pttl(bucket) <= 11_000


# --- failure windows, the alert throttle and the recovery -----------------------------------


def test_failures_round_robin_over_processes_raise_exactly_one_alert(redis_url):
    processes = [Process(redis_url) for _ in range(3)]
    results = [processes[n % 3].fail(request_id=f"req{n}") for n in range(6)]
    alerts = [a for a in results if a is not None]
    assert len(alerts) == 1 and results[4] is alerts[0]
    alert = alerts[0]
    assert (alert.provider, alert.upstream, alert.count, alert.threshold) == ("prov", "main", 5, 5)
    assert alert.sample_request_ids == ("req0", "req1", "req2", "req3", "req4")
    recoveries = [p.tracker.record_success("prov/main") for p in processes for _ in range(2)]
    assert sum(r is not None for r in recoveries) == 1
    assert next(r for r in recoveries if r is not None).failures_since_alert == 1


def test_concurrent_failures_raise_one_alert_per_throttle_window(redis_url):
    processes = [Process(redis_url) for _ in range(4)]
    alerts: list[object] = []

    def worker() -> None:
        for n in range(25):
            alert = processes[n % 4].fail()
            if alert is not None:
                alerts.append(alert)

    run_concurrently(worker, 8)
    assert len(alerts) == 1


def test_window_slides_and_throttle_expires_on_the_injected_clock(redis_url):
    wall = FakeClock(1_700_000_000.0)
    a, b = Process(redis_url, wall), Process(redis_url, wall)
    for _ in range(4):
        assert a.fail() is None
    wall.now += 301  # the four slid out of the 300 s window
    assert [b.fail() for _ in range(4)] == [None] * 4
    assert a.fail() is not None  # five in the window
    wall.now += 30
    assert b.fail() is None  # throttled (60 s)
    wall.now += 31
    assert b.fail() is not None  # a reminder: still failing, throttle over
    assert a.tracker.over_threshold("prov/main")
    assert not a.tracker.over_threshold("other/up")


def test_a_success_asks_redis_only_when_an_alert_may_be_outstanding(redis_url, redis_server):
    a, b = Process(redis_url), Process(redis_url)

    def script_calls() -> int:
        stats = redis_server.client().info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k.startswith(("cmdstat_eval",)))

    before = script_calls()
    for _ in range(100):
        assert b.tracker.record_success("prov/main") is None
    assert script_calls() - before == 1  # once per second per key, not per request
    for n in range(5):
        a.fail(request_id=f"r{n}")
    assert b.tracker.record_success("prov/main") is None  # its "no alert" is still fresh
    b.monotonic.now += 1.01
    recovery = b.tracker.record_success("prov/main")
    assert recovery is not None and (recovery.provider, recovery.upstream) == ("prov", "main")
    assert a.tracker.record_success("prov/main") is None  # a saw failures: it asked Redis


# --- outages ----------------------------------------------------------------------------------


def test_stopped_redis_is_answered_locally_reported_once_and_rejoined(redis_url, redis_server):
    process = Process(redis_url)
    limit = RateLimit(requests_per_minute=1, burst=2)
    assert process.limiter.acquire(("/r", "k"), limit) is None
    redis_server.stop()
    answers = [process.limiter.acquire(("/r", "k"), limit) for _ in range(3)]
    assert answers == [None, None, 60]  # the local bucket: per process, full at first
    assert len(process.events.downs) == 1 and "ConnectionError" in process.events.downs[0]
    assert process.events.errors == ["rate_limit"]  # later calls skip Redis until a probe
    assert process.tracker.record_success("prov/main") is None
    process.monotonic.now += 1.0
    process.limiter.acquire(("/r", "k"), limit)  # the probe: fails, counted, no new outage
    assert process.events.errors == ["rate_limit", "rate_limit"]
    assert len(process.events.downs) == 1 and process.link.health()["state"] == "down"
    redis_server.start()  # empty, as after a crash without persistence
    process.monotonic.now += 1.0
    assert process.link.health() == {"state": "up", "errors": 2}
    assert len(process.events.ups) == 1
    other = Process(redis_url)
    assert [other.limiter.acquire(("/r", "k"), limit) for _ in range(2)] == [None, None]
    assert process.limiter.acquire(("/r", "k"), limit) == 60  # shared again


def test_frozen_redis_costs_one_timeout_then_nothing(redis_url, redis_server):
    process = Process(redis_url, timeout_ms=50)
    limit = RateLimit(requests_per_minute=60, burst=100)
    assert process.limiter.acquire(("/r", "k"), limit) is None  # connected
    redis_server.freeze()
    try:
        started = time.perf_counter()
        assert process.limiter.acquire(("/r", "k"), limit) is None
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(50):
            assert process.limiter.acquire(("/r", "k"), limit) is None
        rest = time.perf_counter() - started
    finally:
        redis_server.thaw()
    assert first < 0.5  # one timeout (50 ms), never redis-py's retries with backoff
    assert rest < 0.1  # while down, no request waits for Redis
    assert len(process.events.downs) == 1 and "Timeout" in process.events.downs[0]
    process.monotonic.now += 1.0
    assert process.limiter.acquire(("/r", "k"), limit) is None
    assert process.link.up and len(process.events.ups) == 1


def test_an_alert_raised_locally_during_an_outage_recovers_locally(redis_url, redis_server):
    process = Process(redis_url)
    redis_server.stop()
    alerts = [process.fail() for _ in range(5)]
    assert alerts[-1] is not None  # per process while Redis is down
    recovery = process.tracker.record_success("prov/main")
    assert recovery is not None and recovery.failures_since_alert == 0


# --- settings, tooling --------------------------------------------------------------------------


def test_ping_reports_version_and_latency(redis_url):
    result = ping(redis_url, 50)
    assert result.ok and result.version and result.version[0].isdigit()
    assert result.latency_ms is not None and 0 <= result.latency_ms < 1000


def test_ping_of_nothing_fails_without_the_password():
    result = ping("redis://:hunter2secret@127.0.0.1:1/0", 50)
    assert not result.ok and result.error
    assert "hunter2secret" not in result.url + result.error
    assert result.url == "redis://:***@127.0.0.1:1/0"


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3cret@127.0.0.1:6379",
        "redis://:s3cret@host:99999/0",
        "redis://:s3cret@host:6379/zero",
        "unix://:s3cret@",
    ],
)
def test_bad_redis_urls_are_rejected_without_being_quoted(url):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"APIROUTER_REDIS_URL": url})
    assert "APIROUTER_REDIS_URL" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_prefix_with_braces_is_rejected():
    with pytest.raises(SettingsError, match="APIROUTER_REDIS_PREFIX"):
        Settings.from_env({"APIROUTER_REDIS_PREFIX": "a{b}:"})


def test_without_a_redis_url_redis_is_never_imported(tmp_path):
    script = (
        "import sys; from apirouter.proxy.app import App; from apirouter import wsgi; from apirouter.ops import cli; "
        "print('redis' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "API_ROUTER_CONFIG_PATH": "openai"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_shared_window_counts_requests_not_attempts_and_names_models(redis_url):
    a, b = Process(redis_url), Process(redis_url)
    for request_id in ("x", "x", "y", "y", "z", "x"):  # retried attempts of three requests
        assert (a if request_id != "y" else b).fail(request_id=request_id) is None
    a.tracker.record_failure("prov/main", Failure("upstream_5xx", 503, "w", model="smart"))
    alert = b.fail(request_id="v")
    assert alert is not None and alert.count == 5
    assert alert.sample_request_ids == ("x", "y", "z", "w", "v")
    assert alert.models == ("fast", "smart")
