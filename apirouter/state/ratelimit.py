"""Thread-safe token buckets keyed by (route, client key), bounded in memory.

A bucket that has refilled to capacity is indistinguishable from a new one, so it can be
dropped at no cost to correctness: every new bucket sweeps a couple of such idle buckets off
the least-recently-used end, and a hard cap bounds memory even under a flood of new keys
(the older router never evicted a bucket).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from apirouter.config.provider import RateLimit


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000):
        self._clock = clock
        self._max_buckets = max_buckets
        # key -> [tokens, last update, refill rate per second, capacity]
        self._buckets: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: tuple[str, str], limit: RateLimit) -> int | None:
        """Take one token. Return None when allowed, else the seconds to wait (Retry-After)."""
        rate = limit.requests_per_minute / 60.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                self._evict(now)
                bucket = self._buckets[key] = [float(limit.burst), now, rate, limit.burst]
            else:
                self._buckets.move_to_end(key)
                bucket[2:] = [rate, limit.burst]  # a hot reload may change the limit
                bucket[0] = min(float(limit.burst), bucket[0] + (now - bucket[1]) * rate)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket[0]) / rate))

    def _evict(self, now: float) -> None:
        """Before adding a bucket: drop up to two idle ones from the LRU end; enforce the cap."""
        for _ in range(min(2, len(self._buckets))):
            oldest_key, (tokens, updated, rate, burst) = next(iter(self._buckets.items()))
            if tokens + (now - updated) * rate < burst:
                break
            del self._buckets[oldest_key]
        while len(self._buckets) >= self._max_buckets:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
