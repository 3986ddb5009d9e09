"""The failure tracker: threshold, sliding window, throttle, recovery, concurrency."""

from __future__ import annotations

import itertools
from collections import defaultdict

from clocks import FakeClock, run_concurrently

from apirouter.state.alerting import REPEATED_FAILURES, Failure, FailureTracker

_numbers: defaultdict[int, itertools.count] = defaultdict(itertools.count)


def fail(tracker, provider="p", n=1, request_id="r"):
    """``n`` failed requests, each a new one: ``r0``, ``r1``... numbered per tracker."""
    numbers = _numbers[id(tracker)]
    return [
        tracker.record_failure(
            provider, Failure("upstream_5xx", 503, f"{request_id}{next(numbers)}")
        )
        for _ in range(n)
    ]


def test_alert_exactly_at_threshold_with_the_real_facts():
    tracker = FailureTracker(
        threshold=3, window_seconds=60, throttle_seconds=30, clock=FakeClock(1000.0)
    )
    results = fail(tracker, n=3)
    assert results[:2] == [None, None]
    alert = results[2]
    assert alert.alert_type == REPEATED_FAILURES
    assert (alert.provider, alert.count, alert.threshold, alert.window_seconds) == ("p", 3, 3, 60)
    assert (alert.last_error_type, alert.last_status) == ("upstream_5xx", 503)
    assert alert.sample_request_ids == ("r0", "r1", "r2")


def test_failures_outside_the_window_expire():
    clock = FakeClock(1000.0)
    tracker = FailureTracker(threshold=3, window_seconds=60, throttle_seconds=1, clock=clock)
    fail(tracker, n=2)
    clock.now += 61
    assert fail(tracker, n=2) == [None, None]  # the first two slid out of the window
    assert fail(tracker, n=1)[0] is not None


def test_throttle_allows_one_alert_per_period():
    clock = FakeClock(1000.0)
    tracker = FailureTracker(threshold=2, window_seconds=300, throttle_seconds=60, clock=clock)
    assert fail(tracker, n=2)[1] is not None
    assert all(a is None for a in fail(tracker, n=10))
    clock.now += 59.9
    assert fail(tracker)[0] is None
    clock.now += 0.2
    later = fail(tracker)[0]
    assert later is not None and later.count == 14


def test_recovery_once_after_an_alert():
    tracker = FailureTracker(
        threshold=2, window_seconds=300, throttle_seconds=0.001, clock=FakeClock(1000.0)
    )
    assert tracker.record_success("p") is None  # no alert, nothing to recover from
    fail(tracker, n=2)
    fail(tracker, n=3)
    recovery = tracker.record_success("p")
    assert recovery is not None and recovery.failures_since_alert == 3
    assert tracker.record_success("p") is None
    assert fail(tracker)[0] is None  # the window restarted after recovery


def test_providers_are_independent():
    tracker = FailureTracker(
        threshold=2, window_seconds=300, throttle_seconds=60, clock=FakeClock(1000.0)
    )
    fail(tracker, "a")
    fail(tracker, "b")
    assert fail(tracker, "a")[0].provider == "a"
    assert fail(tracker, "b")[0].provider == "b"
    assert tracker.record_success("b") is not None
    assert tracker.record_success("a") is not None


def test_many_threads_failing_at_once_raise_exactly_one_alert():
    tracker = FailureTracker(
        threshold=5, window_seconds=300, throttle_seconds=60, clock=FakeClock(1000.0)
    )
    alerts = []
    run_concurrently(lambda: alerts.extend(a for a in fail(tracker, n=50) if a is not None), 16)
    assert len(alerts) == 1


def test_a_request_counts_once_however_often_its_attempts_failed():
    tracker = FailureTracker(
        threshold=3, window_seconds=300, throttle_seconds=60, clock=FakeClock(1000.0)
    )
    for request_id in ("a", "a", "b", "b", "a"):
        assert tracker.record_failure("p", Failure("upstream_5xx", 503, request_id)) is None
    alert = tracker.record_failure("p", Failure("upstream_5xx", 503, "c", model="fast"))
    assert alert is not None and alert.count == 3
    assert alert.sample_request_ids == ("a", "b", "c")
    assert alert.models == ("fast",)
