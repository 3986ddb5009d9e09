"""Token buckets: refill, per-key isolation, bounded memory."""

from __future__ import annotations

from clocks import FakeClock, run_concurrently

from apirouter.config.provider import RateLimit
from apirouter.state.ratelimit import RateLimiter


def test_burst_then_refill_at_rpm_over_60():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limit = RateLimit(requests_per_minute=30, burst=2)
    key = ("/r", "k")
    assert [limiter.acquire(key, limit) for _ in range(3)] == [None, None, 2]
    clock.now = 1.0
    assert limiter.acquire(key, limit) == 1  # half a token so far
    clock.now = 2.0
    assert limiter.acquire(key, limit) is None


def test_idle_buckets_are_evicted_and_memory_is_capped():
    clock = FakeClock()
    limiter = RateLimiter(clock, max_buckets=100)
    limit = RateLimit(requests_per_minute=60, burst=1)
    for n in range(50):
        limiter.acquire(("/r", f"key{n}"), limit)
    clock.now = 10.0  # all refilled: idle
    for n in range(50, 90):
        limiter.acquire(("/r", f"key{n}"), limit)
    assert len(limiter) < 50  # idle buckets were swept as new ones came
    for n in range(1000):
        limiter.acquire(("/r", f"flood{n}"), limit)
    assert len(limiter) <= 100


def test_a_single_key_is_never_evicted_by_itself():
    limiter = RateLimiter(FakeClock())
    limit = RateLimit(requests_per_minute=1, burst=1)
    assert limiter.acquire(("/r", "only"), limit) is None
    assert limiter.acquire(("/r", "only"), limit) == 60


def test_concurrent_acquires_never_overspend():
    limiter = RateLimiter(FakeClock())
    limit = RateLimit(requests_per_minute=1, burst=50)
    allowed = []

    def worker():
        for _ in range(10):
            if limiter.acquire(("/r", "k"), limit) is None:
                allowed.append(1)

    run_concurrently(worker, 20)
    assert len(allowed) == 50
