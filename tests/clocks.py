"""Time in tests: an injected clock moved by hand, polling with a deadline instead of
sleeping, and threads released at one instant."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until predicate() is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class FakeClock:
    """An injected clock that tests move by hand, so windows and throttles never sleep."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_concurrently(work: Callable[[], None], threads: int) -> None:
    """Run `work` on `threads` threads released at the same instant; wait for all."""
    barrier = threading.Barrier(threads)

    def start_together() -> None:
        barrier.wait()
        work()

    pool = [threading.Thread(target=start_together) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
