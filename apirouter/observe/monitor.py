"""The dead man's switch: a Sentry cron check-in at start-up, then once per interval
(``APIROUTER_SENTRY_MONITOR``, ``APIROUTER_SENTRY_MONITOR_INTERVAL_MINUTES``).

Every other alert needs a running router that can reach Sentry. This one is raised by
Sentry itself when the check-ins stop: the router is down, or its path to Sentry is broken
(a rotated key, say) even while no request is failing. Check-ins travel with the alerts
(``delivery.AlertSender``), so a failure flood cannot crowd one out.

Sentry's answer to each check-in feeds ``/health``'s ``sentry`` state, so an idle router
notices a rejected key within one interval. In a fleet, Redis picks one sender per interval
and shares its answer with every replica (``state.checkins``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from apirouter.observe import tracking
from apirouter.state.checkins import CheckInResult, CheckIns

log = logging.getLogger("apirouter.monitor")
Send = Callable[[str, int, Callable[[str], None]], bool]  # tracking.capture_check_in


class Monitor:
    """One process's side of the switch: it tries to claim each interval and, when it
    wins (always, without a fleet), sends the check-in and keeps Sentry's answer."""

    def __init__(
        self,
        slug: str,
        interval: float,
        check_ins: CheckIns,
        send: Send = tracking.capture_check_in,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.slug = slug
        self.interval = interval  # seconds; whole minutes outside tests
        self._check_ins = check_ins
        self._send = send
        self._wall_clock = wall_clock
        self.ticks = 0  # intervals this process has tried to claim (start-up included)

    def run(self, stopping: threading.Event) -> None:
        """Check in now, then once per interval until ``stopping`` is set."""
        self.tick()
        while not stopping.wait(self.interval):
            self.tick()

    def tick(self) -> bool:
        """Send this interval's check-in if it is ours to send; whether one was sent."""
        try:
            if not self._check_ins.claim(self.interval):
                return False
            minutes = max(1, round(self.interval / 60))
            return self._send(self.slug, minutes, self._answered)
        except Exception:  # a switch that dies silently would page "router down" for nothing
            log.exception("sending the Sentry check-in failed")
            return False
        finally:
            self.ticks += 1

    def _answered(self, state: str) -> None:
        self._check_ins.record(CheckInResult(state, self._wall_clock()), self.interval)
        if state != "ok":
            log.error(
                "Sentry answered the check-in of monitor %s with %s: Sentry will report the "
                "router as down",
                self.slug,
                state,
                extra={"sentry_reported": True},
            )

    def health(self, sentry: dict[str, Any], answered_at: float | None) -> dict[str, Any]:
        """``/health``'s ``sentry`` object with the newest check-in result folded in: it is
        the state when it is newer than this process's own last answer from Sentry."""
        latest = self._check_ins.latest()
        merged = {**sentry, "monitor": {"slug": self.slug, "last_check_in": None}}
        if latest is None:
            return merged
        merged["monitor"]["last_check_in"] = {"state": latest.state, "at": latest.at}
        if answered_at is None or latest.at >= answered_at:
            merged["state"] = latest.state
        if latest.state == "ok":
            merged["last_accepted"] = max(latest.at, sentry.get("last_accepted") or 0.0)
        return merged
