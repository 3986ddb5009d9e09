"""Which upstream serves the next attempt, and which ones are cooling down.

The failure windows that raise alerts (``alerting.FailureTracker``) also condemn an
upstream: when its window reaches the threshold, the Reporter opens its breaker here and
the upstream is skipped for a cooldown (30 s by default, doubling up to 5 min while the
failures continue). After the cooldown one request is let through as a probe; success
closes the breaker. A 429 parks an upstream until its ``Retry-After`` without counting as
a failure. Thread-safe; the clock and the random source are injected.

States, as exported in ``apirouter_upstream_state``: 0 healthy, 1 cooling down, 2 probing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from apirouter.config.provider import Cooldown, Endpoint, ProviderConfig, UpstreamSpec


class State(IntEnum):
    HEALTHY = 0
    COOLING = 1
    PROBING = 2


@dataclass(frozen=True)
class Target:
    """One upstream of one provider (the configured one, or a fallback) for an attempt."""

    provider: ProviderConfig
    upstream: UpstreamSpec
    fallback: bool = False

    @property
    def key(self) -> str:
        """``provider/upstream``: the failure window and breaker of this upstream."""
        return f"{self.provider.name}/{self.upstream.name}"

    @property
    def label(self) -> str:  # X-Apirouter-Upstream
        return self.key


@dataclass
class _Breaker:
    state: State = State.HEALTHY
    until: float = 0.0  # cooling down until then
    cooldown: float = 0.0  # the current pause; doubles while failures continue
    parked_until: float = 0.0  # a 429's Retry-After
    last_error: str | None = None


class Breakers:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()

    # --- choosing ----------------------------------------------------------------------

    def choose(
        self,
        config: ProviderConfig,
        tried: Iterable[str],
        pinned: bool,
        endpoint: Endpoint,
    ) -> Target | None:
        """The upstream for the next attempt, or None when nothing can serve.

        Upstreams not yet tried come first, then (when every one was tried) any that is
        neither cooling down nor parked, so a lone upstream is retried in place. ``pinned``
        (stateful routes) keeps the request on the provider's first upstream. A fallback
        that has switched this route off is skipped.
        """
        chain = [config] if pinned else [config, *config.fallbacks]
        chain = [p for p in chain if endpoint.passthrough or endpoint.local_path in p.endpoints]
        tried = set(tried)
        with self._lock:
            now = self._clock()
            for fresh_only in (True, False):
                for provider in chain:
                    upstreams = provider.upstreams[:1] if pinned else provider.upstreams
                    targets = [
                        Target(provider, u, fallback=provider is not config) for u in upstreams
                    ]
                    usable = [
                        t
                        for t in targets
                        if self._usable(t.key, now) and not (fresh_only and t.key in tried)
                    ]
                    if usable:
                        target = self._pick(usable)
                        self._claim(target.key, now)
                        return target
        return None

    def _usable(self, key: str, now: float) -> bool:
        breaker = self._breakers.get(key)
        if breaker is None:
            return True
        if breaker.parked_until > now:
            return False
        if breaker.state is State.HEALTHY:
            return True
        return now >= breaker.until  # cooldown over (or a probe went silent): one probe

    def _pick(self, targets: list[Target]) -> Target:
        if len(targets) == 1:
            return targets[0]
        weights = [t.upstream.weight for t in targets]
        return self._rng.choices(targets, weights)[0]

    def _claim(self, key: str, now: float) -> None:
        breaker = self._breakers.get(key)
        if breaker is not None and breaker.state is not State.HEALTHY and now >= breaker.until:
            # this request is the probe; others wait for its outcome, or for one more
            # cooldown if it never reports one
            breaker.state = State.PROBING
            breaker.until = now + breaker.cooldown

    def retry_after(self, config: ProviderConfig) -> int:
        """Seconds until the first upstream of the chain can be tried again."""
        now = self._clock()
        ends = [
            max(b.until, b.parked_until)
            for provider in (config, *config.fallbacks)
            for u in provider.upstreams
            if (b := self._breakers.get(Target(provider, u).key)) is not None
        ]
        return max(1, int(min(ends, default=now) - now + 0.999))

    # --- what the Reporter tells us ----------------------------------------------------

    def open(self, key: str, cooldown: Cooldown) -> None:
        """Cool an upstream down; a failed probe doubles the pause, up to the maximum."""
        with self._lock:
            breaker = self._breakers.setdefault(key, _Breaker())
            if breaker.state is State.HEALTHY:
                breaker.cooldown = cooldown.initial_secs
            else:
                breaker.cooldown = min(breaker.cooldown * 2, cooldown.max_secs)
            breaker.state = State.COOLING
            breaker.until = self._clock() + breaker.cooldown

    def failed(self, key: str, error_type: str) -> bool:
        """Note a failure; True when it was a probe's (so the breaker must open again)."""
        with self._lock:
            breaker = self._breakers.setdefault(key, _Breaker())
            breaker.last_error = error_type
            return breaker.state is State.PROBING

    def succeeded(self, key: str) -> bool:
        """Close the breaker; True when it was open (cooling or probing)."""
        breaker = self._breakers.get(key)
        if breaker is None or breaker.state is State.HEALTHY:
            return False  # the common path takes no lock
        with self._lock:
            return _close(breaker)

    def release(self, key: str) -> None:
        """A claimed probe that never reached the upstream (the request failed first):
        the next request may probe at once, instead of after one more cooldown."""
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is not None and breaker.state is State.PROBING:
                breaker.state = State.COOLING
                breaker.until = self._clock()

    def park(self, key: str, seconds: float) -> None:
        with self._lock:
            breaker = self._breakers.setdefault(key, _Breaker())
            breaker.parked_until = self._clock() + seconds

    # --- what /health and /metrics read ------------------------------------------------

    def state(self, key: str) -> State:
        breaker = self._breakers.get(key)
        return State.HEALTHY if breaker is None else breaker.state

    def last_error(self, key: str) -> str | None:
        breaker = self._breakers.get(key)
        return None if breaker is None else breaker.last_error

    def can_serve(self, config: ProviderConfig) -> bool:
        """Could a request be sent somewhere right now (ignoring 429 parking)?"""
        now = self._clock()
        return any(
            (b := self._breakers.get(Target(p, u).key)) is None
            or b.state is State.HEALTHY
            or now >= b.until
            for p in (config, *config.fallbacks)
            for u in p.upstreams
        )

    def describe(self, config: ProviderConfig) -> list[dict[str, str | None]]:
        """Each upstream of the chain for /health: provider, name, state, last error."""
        return [
            {
                "provider": p.name,
                "name": u.name,
                "state": self.state(Target(p, u).key).name.lower(),
                "last_error": self.last_error(Target(p, u).key),
            }
            for p in (config, *config.fallbacks)
            for u in p.upstreams
        ]

    def healthy_elsewhere(self, target: Target) -> bool:
        """Is there somewhere else to send traffic if this upstream cools down?

        A fallback provider's upstreams may always cool (the configured provider is
        probed again after its own cooldown); a configured upstream only when another of
        its provider's upstreams is healthy or a fallback exists, so a lone upstream with
        no fallback is never cooled down: the router keeps trying it rather than
        answering 503s of its own.
        """
        if target.fallback or target.provider.fallbacks:
            return True
        return any(
            self.state(Target(target.provider, u).key) is State.HEALTHY
            for u in target.provider.upstreams
            if u.name != target.upstream.name
        )


def _close(breaker: _Breaker) -> bool:
    was_open = breaker.state is not State.HEALTHY  # another thread may have closed it
    breaker.state = State.HEALTHY
    breaker.cooldown = 0.0
    return was_open
