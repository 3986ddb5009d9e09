"""Shared state in Redis: token buckets, failure windows and the alert throttle for a fleet.

Each decision is one Lua script (``register_script``: EVALSHA, reloaded by itself after a
Redis restart), so concurrent processes never race on a read-modify-write. Time inside the
scripts is Redis's own ``TIME`` (one clock for the whole fleet; replicas' clocks differ),
unless a clock is injected, as tests do.

Keys: ``<APIROUTER_REDIS_PREFIX>v1:<kind>:{<tag>}[:<part>]``. The schema version keeps a
rolling upgrade from reading another version's data; the ``{tag}`` puts every key of one
decision in one Redis Cluster slot; every write sets a TTL, so memory stays bounded with
no sweeper (a bucket expires when it would have refilled, a window when it is empty).

Redis never causes an error to a client. Every call goes through ``RedisLink.run``: on any
Redis error or timeout (``APIROUTER_REDIS_TIMEOUT_MS``; redis-py's own retries are off, so
the bound holds) the caller decides on its in-process fallback instead; the link counts the
error, reports the outage once, skips Redis while it is down (one probe per second, so a
dead Redis costs requests nothing), and reports the recovery when a probe succeeds.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from apirouter.config.provider import RateLimit
from apirouter.config.redis_url import masked
from apirouter.config.settings import Settings
from apirouter.state.alerting import (
    MAX_REMEMBERED_FAILURES,
    MAX_SAMPLE_REQUEST_IDS,
    Alert,
    Failure,
    FailureTracker,
    Recovery,
    split_key,
)
from apirouter.state.checkins import CheckInResult, CheckIns, LocalCheckIns
from apirouter.state.interface import RedisEvents, StateBackend, identity
from apirouter.state.ratelimit import RateLimiter

SCHEMA = "v1:"
PROBE_SECONDS = 1.0  # while Redis is down, one call per this long tries it again
SUCCESS_RECHECK_SECONDS = 1.0  # how stale a "not alerting" answer may be (see record_success)
ALERT_MEMORY_SECONDS = 86_400  # an outstanding alert waits this long for its recovery
T = TypeVar("T")

# Shared by the scripts: `now` is ARGV[1] when given (tests), else Redis's clock.
_NOW = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
"""

# KEYS[1] bucket hash {tokens, updated}. ARGV: now, refill per second, burst.
# Returns 0 when a token was taken, else the whole seconds to wait (Retry-After, >= 1).
TOKEN_BUCKET = (
    _NOW
    + """
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(saved[1])
local updated = tonumber(saved[2])
if tokens == nil or updated == nil then
  tokens, updated = burst, now
end
if now > updated then
  tokens = tokens + (now - updated) * rate
  updated = now
end
tokens = math.min(burst, tokens)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) / rate))
end
redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'updated', fmt(updated))
-- full again after (burst - tokens) / rate s: then it equals a new bucket and may go
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return wait
"""
)

# KEYS: [1] failed requests (zset: request id -> last failure), [2] state hash, [3] recent
# request ids (list), [4] models (hash: model -> last failure). ARGV: now, window s,
# threshold, throttle s, request id, samples kept, times kept, state TTL s, model ('' none).
# A request that fails again counts once. Returns {alert raised (0/1), failed requests in
# window, recent ids newest first, models in the window}.
RECORD_FAILURE = (
    _NOW
    + """
local window, threshold, throttle = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local added = redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - window))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[7]) + 1))
local count = redis.call('ZCARD', KEYS[1])
if added == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
  if redis.call('HGET', KEYS[2], 'alerting') == '1' then
    redis.call('HINCRBY', KEYS[2], 'since', 1)
  end
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[9], fmt(now))
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_alert'))
local alert = 0
local models = {}
if count >= threshold and (last == nil or now - last >= throttle) then
  redis.call('HSET', KEYS[2], 'alerting', '1', 'last_alert', fmt(now), 'since', '0')
  alert = 1
  local seen = redis.call('HGETALL', KEYS[4])
  for i = 1, #seen, 2 do
    if tonumber(seen[i + 1]) > now - window then table.insert(models, seen[i]) end
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
redis.call('PEXPIRE', KEYS[3], math.ceil(window * 1000) + 1000)
redis.call('PEXPIRE', KEYS[4], math.ceil(window * 1000) + 1000)
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[8]) * 1000))
return {alert, count, redis.call('LRANGE', KEYS[3], 0, -1), models}
"""
)

# KEYS as RECORD_FAILURE. Returns -1 when not alerting, else the failures since the alert
# (and the alert is over: exactly one caller in the fleet gets the recovery).
RECORD_SUCCESS = """
if redis.call('HGET', KEYS[2], 'alerting') ~= '1' then
  return -1
end
local since = tonumber(redis.call('HGET', KEYS[2], 'since')) or 0
redis.call('HSET', KEYS[2], 'alerting', '0')
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return since
"""

# KEYS[1] failure times. ARGV: now, window s. Failures inside the window (for cooldowns).
COUNT_FAILURES = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now - tonumber(ARGV[2])), '+inf')
"""
)

_READABLE_TAG = re.compile(r"[A-Za-z0-9._/:-]{1,80}")


class Keys:
    """The key layout. Identities are hashed into the tag unless short and plain."""

    def __init__(self, prefix: str) -> None:
        self.base = prefix + SCHEMA

    def bucket(self, key: Hashable) -> list[str]:
        return [f"{self.base}rl:{{{_digest(identity(key))}}}"]

    def check_in(self, slug: str, part: str) -> str:
        return f"{self.base}mon:{{{slug}}}:{part}"

    def window(self, key: str) -> list[str]:
        tag = key if _READABLE_TAG.fullmatch(key) else _digest(key)
        stem = f"{self.base}fw:{{{tag}}}"
        return [f"{stem}:times", f"{stem}:state", f"{stem}:recent", f"{stem}:models"]


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class _Local:
    """The marker ``RedisLink.run`` returns when the caller must decide locally."""


LOCAL = _Local()


class RedisLink:
    """One Redis client, whether it works, and what happens when it does not."""

    def __init__(
        self,
        client: redis.Redis,
        events: RedisEvents,
        clock: Callable[[], float] = time.monotonic,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        self.client = client
        self._events = events
        self._clock = clock
        self._probe_seconds = probe_seconds
        self._down_since: float | None = None
        self._next_probe = 0.0
        self.errors = 0
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self._down_since is None

    def run(self, operation: str, call: Callable[[], T]) -> T | _Local:
        """``call()``'s result, or ``LOCAL`` when Redis is down or fails now."""
        if self._down_since is not None and not self._probe_due():
            return LOCAL
        started = self._clock()
        try:
            result = call()
        except (redis.RedisError, OSError) as exc:
            self._failed(operation, exc)
            return LOCAL
        if self._down_since is not None:
            self._recovered(started)
        return result

    def probe(self) -> None:
        """Check a down Redis now if a probe is due (``/health`` calls this)."""
        if self._down_since is not None:
            self.run("ping", self.client.ping)

    def _probe_due(self) -> bool:
        """True for one caller per probe period; the others decide locally meanwhile."""
        with self._lock:
            now = self._clock()
            if now < self._next_probe:
                return False
            self._next_probe = now + self._probe_seconds
            return True

    def _failed(self, operation: str, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            now = self._clock()
            self._next_probe = now + self._probe_seconds
            began = self._down_since is None
            if began:
                self._down_since = now
        self._events.error(operation)
        if began:
            self._events.down(f"{type(exc).__name__}: {exc}"[:300])

    def _recovered(self, started: float) -> None:
        with self._lock:
            # A call that began before the outage proves nothing about Redis now.
            if self._down_since is None or started < self._down_since:
                return
            outage = self._clock() - self._down_since
            self._down_since = None
        self._events.up(outage)

    def health(self) -> dict[str, Any]:
        self.probe()
        return {"state": "up" if self.up else "down", "errors": self.errors}


def _clock_arg(clock: Callable[[], float] | None) -> str:
    return "" if clock is None else repr(clock())


class RedisRateLimiter:
    """Token buckets shared by the fleet; same semantics as ``RateLimiter``."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        fallback: RateLimiter,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._link = link
        self._keys = keys
        self._fallback = fallback
        self._clock = clock  # None: Redis's clock
        self._script = link.client.register_script(TOKEN_BUCKET)

    def acquire(self, key: tuple[str, str], limit: RateLimit) -> int | None:
        """Take one token: None when allowed, else the seconds to wait (Retry-After)."""
        args: list[str | int] = [
            _clock_arg(self._clock),
            repr(limit.requests_per_minute / 60.0),
            limit.burst,
        ]
        wait = self._link.run(
            "rate_limit", lambda: self._script(keys=self._keys.bucket(key), args=args)
        )
        if isinstance(wait, _Local):
            return self._fallback.acquire(key, limit)
        return int(wait) or None

    def __len__(self) -> int:
        """Buckets in this process's memory (the fallback's); shared ones live in Redis."""
        return len(self._fallback)


@dataclass(frozen=True)
class WindowSettings:
    threshold: int
    window_seconds: float
    throttle_seconds: float

    @property
    def state_ttl(self) -> float:
        return max(self.window_seconds, self.throttle_seconds) + ALERT_MEMORY_SECONDS


class RedisFailureTracker:
    """Failure windows and the alert throttle shared by the fleet.

    Exactly one process gets each ``Alert`` (one per throttle window, fleet-wide) and one
    gets the ``Recovery``: both are decided inside a script. A success costs a Redis call
    only when an alert may be outstanding: after this process saw a failure, or once per
    ``SUCCESS_RECHECK_SECONDS`` per key (another process may have raised the alert), so the
    common healthy path adds no round trip per request.
    """

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        fallback: FailureTracker,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._keys = keys
        self._fallback = fallback
        self._clock = clock
        self._monotonic = monotonic
        self.settings = WindowSettings(
            fallback.threshold, fallback.window_seconds, fallback.throttle_seconds
        )
        client = link.client
        self._failure = client.register_script(RECORD_FAILURE)
        self._success = client.register_script(RECORD_SUCCESS)
        self._count = client.register_script(COUNT_FAILURES)
        self._recheck_at: dict[str, float] = {}

    def record_failure(self, key: str, failure: Failure) -> Alert | None:
        s = self.settings
        args: list[str | int] = [
            _clock_arg(self._clock),
            repr(s.window_seconds),
            s.threshold,
            repr(s.throttle_seconds),
            failure.request_id,
            MAX_SAMPLE_REQUEST_IDS,
            MAX_REMEMBERED_FAILURES,
            repr(s.state_ttl),
            failure.model or "",
        ]
        result = self._link.run(
            "record_failure", lambda: self._failure(keys=self._keys.window(key), args=args)
        )
        if isinstance(result, _Local):
            return self._fallback.record_failure(key, failure)
        self._recheck_at.pop(key, None)  # the next success asks Redis
        alerted, count, recent, models = result
        if not alerted:
            return None
        provider, upstream = split_key(key)
        return Alert(
            provider=provider,
            upstream=upstream,
            count=int(count),
            threshold=s.threshold,
            window_seconds=s.window_seconds,
            last_error_type=failure.error_type,
            last_status=failure.status,
            sample_request_ids=tuple(_text(r) for r in reversed(recent)),
            models=tuple(sorted(_text(m) for m in models)),
        )

    def record_success(self, key: str) -> Recovery | None:
        recovery = self._fallback.record_success(key)  # an alert raised during an outage
        if recovery is not None:
            return recovery
        if self._monotonic() < self._recheck_at.get(key, 0.0):
            return None
        result = self._link.run(
            "record_success", lambda: self._success(keys=self._keys.window(key))
        )
        if isinstance(result, _Local):
            return None
        if int(result) < 0:
            self._recheck_at[key] = self._monotonic() + SUCCESS_RECHECK_SECONDS
            return None
        return Recovery(*split_key(key), int(result))

    def over_threshold(self, key: str) -> bool:
        """Did the shared window reach the threshold (whether or not an alert went out)?"""
        args = [_clock_arg(self._clock), repr(self.settings.window_seconds)]
        count = self._link.run(
            "count_failures", lambda: self._count(keys=self._keys.window(key)[:1], args=args)
        )
        if isinstance(count, _Local):
            local = getattr(self._fallback, "over_threshold", None)
            return bool(local and local(key))
        return int(count) >= self.settings.threshold


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def client(url: str, timeout_ms: int) -> redis.Redis:
    """A client whose every call is bounded by the timeout: no retries, no backoff.

    redis-py 6+ retries three times with backoff by default, which would multiply the
    bound; a stalled (SIGSTOPped) Redis must cost a request at most one timeout.
    """
    seconds = timeout_ms / 1000.0
    pool = redis.ConnectionPool.from_url(
        url,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        client_name="apirouter",
    )
    return redis.Redis(connection_pool=pool)


def backend(
    settings: Settings,
    events: RedisEvents,
    fallback_limiter: RateLimiter,
    fallback_tracker: FailureTracker,
) -> StateBackend:
    """The Redis backend, with the in-process pair as its fallback."""
    assert settings.redis_url
    link = RedisLink(client(settings.redis_url, settings.redis_timeout_ms), events)
    keys = Keys(settings.redis_prefix)
    check_ins: CheckIns = LocalCheckIns()
    if settings.sentry_monitor:
        check_ins = RedisCheckIns(link, keys, settings.sentry_monitor, LocalCheckIns())
    return StateBackend(
        limiter=RedisRateLimiter(link, keys, fallback_limiter),
        tracker=RedisFailureTracker(link, keys, fallback_tracker),
        health=link.health,
        close=link.client.connection_pool.disconnect,
        check_ins=check_ins,
    )


class RedisCheckIns:
    """The dead man's switch for a fleet: one check-in per interval between all replicas,
    and the sender's result shared with every replica for 2 intervals.

    Intervals are numbered on Redis's clock; the first replica to ``SET NX`` an interval's
    key sends that interval's check-in. Every replica tries once per interval, so each
    interval has exactly one sender, and check-ins are at most 2 intervals apart. While
    Redis is down every replica sends its own: a Redis outage must never look like a
    router outage to Sentry."""

    def __init__(self, link: RedisLink, keys: Keys, slug: str, fallback: LocalCheckIns) -> None:
        self._link = link
        self._claims = keys.check_in(slug, "interval")
        self._result = keys.check_in(slug, "result")
        self._fallback = fallback

    def claim(self, interval: float) -> bool:
        def call() -> bool:
            seconds, micros = self._link.client.time()
            number = int((seconds + micros / 1e6) // interval)
            key = f"{self._claims}:{number}"
            return bool(self._link.client.set(key, "1", nx=True, px=_millis(2 * interval)))

        claimed = self._link.run("check_in", call)
        return True if isinstance(claimed, _Local) else claimed

    def record(self, result: CheckInResult, interval: float) -> None:
        self._fallback.record(result, interval)
        value = json.dumps({"state": result.state, "at": result.at})
        self._link.run(
            "check_in", lambda: self._link.client.set(self._result, value, px=_millis(2 * interval))
        )

    def latest(self) -> CheckInResult | None:
        value = self._link.run("check_in", lambda: self._link.client.get(self._result))
        if isinstance(value, _Local):
            return self._fallback.latest()
        if value is None:  # nobody checked in for 2 intervals: nothing shared to show
            return None
        document = json.loads(value)
        return CheckInResult(str(document["state"]), float(document["at"]))


def _millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@dataclass(frozen=True)
class PingResult:
    url: str  # masked
    ok: bool
    version: str | None = None
    latency_ms: float | None = None
    error: str | None = None


def ping(url: str, timeout_ms: int, clock: Callable[[], float] = time.perf_counter) -> PingResult:
    """Connect, PING, and read the server version (``check-config --connect``)."""
    shown = masked(url)
    connection = client(url, max(timeout_ms, 1000))  # a first connect may need TLS/AUTH
    try:
        connection.ping()  # connect first: latency is the round trip, not the handshake
        started = clock()
        connection.ping()
        latency = (clock() - started) * 1000
        version = str(connection.info("server").get("redis_version", "unknown"))
    except (redis.RedisError, OSError) as exc:
        return PingResult(shown, False, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        connection.connection_pool.disconnect()
    return PingResult(shown, True, version, round(latency, 3))
