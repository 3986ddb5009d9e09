"""Which upstream serves the next attempt, and which ones are cooling down.

Each upstream has its own failure window (in ``scopes.ScopeTable``, per process, with the
alert's threshold and window) for whole-upstream failures: connect, DNS and TLS failures,
timeouts before the headers, failed health checks, 5xx on routes without a model. When it
fills, the upstream is skipped for a cooldown (30 s by default, doubling up to 5 min while
the failures continue). After the cooldown one request is let through as a probe; success
closes the breaker. A model's failures and a 429 on an operator key act on that (upstream,
model) alone, and only while another target can take the request. The alert's own window
(``alerting``, shared in fleet mode) counts every failure but decides no cooldown.
Thread-safe; the clocks and the random source are injected.

States, as exported in ``apirouter_upstream_state``: 0 healthy, 1 cooling down, 2 probing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from apirouter.config.provider import Cooldown, Endpoint, ProviderConfig, UpstreamSpec
from apirouter.state.scopes import ScopeTable

MAX_LISTED_SCOPES = 20  # parked and cooling models shown per upstream in /health


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

    # ``provider/upstream``: the failure window and breaker of this upstream (read about
    # ten times a request, so computed once)
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.provider.name}/{self.upstream.name}")

    @property
    def label(self) -> str:  # X-Apirouter-Upstream
        return self.key


@dataclass
class _Breaker:
    state: State = State.HEALTHY
    until: float = 0.0  # cooling down until then
    cooldown: float = 0.0  # the current pause; doubles while failures continue
    last_error: str | None = None


def scope_model(provider: ProviderConfig, sent_model: str | None) -> str | None:
    """The upstream model a request asks this provider for: mapped, else as sent."""
    if sent_model is None:
        return None
    return provider.model_mapping.get(sent_model, sent_model)


class Breakers:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        scopes: ScopeTable | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall  # /health shows when a park ends in Unix seconds
        self._rng = rng or random.Random()
        self._breakers: dict[str, _Breaker] = {}
        self.scopes = scopes or ScopeTable()
        self._lock = threading.Lock()

    # --- choosing ----------------------------------------------------------------------

    def chain(self, config: ProviderConfig, stateful: bool, endpoint: Endpoint) -> list[Target]:
        """Every target a request may reach, in order of preference. A stateful request
        (``statefulness``) has one: the provider's first upstream. A fallback that has
        switched this route off is left out."""
        providers = [config] if stateful else [config, *config.fallbacks]
        return [
            Target(provider, upstream, fallback=provider is not config)
            for provider in providers
            if endpoint.passthrough or endpoint.local_path in provider.endpoints
            for upstream in (provider.upstreams[:1] if stateful else provider.upstreams)
        ]

    def choose(
        self,
        config: ProviderConfig,
        tried: Iterable[str],
        stateful: bool,
        endpoint: Endpoint,
        sent_model: str | None = None,
        *,
        again: bool = False,
        accept: Callable[[Target], bool] | None = None,
    ) -> Target | None:
        """The target for the next attempt, or None when nothing can serve.

        Targets not yet tried, and not cooling down, are the candidates (``again``: tried
        ones too); ``accept`` may narrow them. Among them, one whose (upstream, model) is
        neither parked nor cooling is preferred, the configured provider's upstreams by
        weight before each fallback in turn; with nowhere else to go, a parked or cooling
        model is tried anyway: the client then gets the provider's own answer.
        """
        tried = set(tried)
        with self._lock:
            now = self._clock()
            candidates = [
                t
                for t in self.chain(config, stateful, endpoint)
                if (again or t.key not in tried)
                and self._usable(t.key, now)
                and (accept is None or accept(t))
            ]
            free = [
                t
                for t in candidates
                if not self.scopes.blocked(t.key, scope_model(t.provider, sent_model), now)
            ]
            for pool in (free, candidates):
                if pool:
                    first = pool[0].provider
                    target = self._pick([t for t in pool if t.provider is first])
                    self._claim(target.key, now)
                    return target
        return None

    def _usable(self, key: str, now: float) -> bool:
        breaker = self._breakers.get(key)
        if breaker is None:
            return True
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
            b.until
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

    def upstream_failed(self, target: Target, error_type: str) -> None:
        """A whole-upstream failure (connect, DNS, TLS, a timeout before the headers, a
        health check, a 5xx on a route without a model), counted in the upstream's own
        window. The breaker opens when a probe failed, or when the window fills while the
        upstream was healthy and somewhere else can serve: failures of requests already in
        flight when it opened do not stretch the pause."""
        with self._lock:
            breaker = self._breakers.setdefault(target.key, _Breaker())
            breaker.last_error = error_type
            probe_failed = breaker.state is State.PROBING
            was_healthy = breaker.state is State.HEALTHY
            full = self.scopes.failed(target.key, None, self._clock())
        if probe_failed or (was_healthy and full and self.healthy_elsewhere(target)):
            self.open(target.key, target.provider.cooldown)

    def model_failed(self, target: Target, model: str, error_type: str) -> None:
        """A model's failure (its 5xx, its stream cut or gone silent), counted in the
        (upstream, model) window. When that fills and somewhere else can take its requests,
        that model alone cools down. The upstream answered, so a probe it carried closes the
        upstream's breaker (as a 429 does), without counting as a recovery."""
        with self._lock:
            breaker = self._breakers.setdefault(target.key, _Breaker())
            breaker.last_error = error_type
            if breaker.state is State.PROBING:
                _close(breaker)
            full = self.scopes.failed(target.key, model, self._clock())
        if full and self.healthy_elsewhere(target):
            cooldown = target.provider.cooldown
            with self._lock:
                self.scopes.cool(
                    target.key, model, self._clock(), cooldown.initial_secs, cooldown.max_secs
                )

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

    def park(self, key: str, model: str | None, seconds: float) -> None:
        """A 429 on an operator key: skip (upstream, model) for ``seconds`` where possible."""
        with self._lock:
            now = self._clock()
            self.scopes.park(key, model, now + seconds, now)

    def model_succeeded(self, key: str, model: str | None) -> None:
        """A model answered: its next cool-down starts from the initial pause again."""
        if model is not None and self.scopes.holds(key):  # the common path takes no lock
            with self._lock:
                self.scopes.succeeded(key, model)

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

    def describe(self, config: ProviderConfig) -> list[dict[str, Any]]:
        """Each upstream of the chain for /health: provider, name, state, last error, and
        its parked and cooling models (at most ``MAX_LISTED_SCOPES`` each, plus counts)."""
        described = []
        for p in (config, *config.fallbacks):
            for u in p.upstreams:
                key = Target(p, u).key
                parked, cooling = self.scoped(key)
                described.append(
                    {
                        "provider": p.name,
                        "name": u.name,
                        "state": self.state(key).name.lower(),
                        "last_error": self.last_error(key),
                        "parked": self._listed(parked),
                        "parked_count": len(parked),
                        "cooling": self._listed(cooling),
                        "cooling_count": len(cooling),
                    }
                )
        return described

    def scoped(self, key: str) -> tuple[list[tuple[str | None, float]], ...]:
        """(model, until) of this upstream's parked scopes, and of its cooling models."""
        with self._lock:
            now = self._clock()
            return self.scopes.parked(key, now), self.scopes.cooling(key, now)

    def _listed(self, scopes: list[tuple[str | None, float]]) -> list[dict[str, Any]]:
        now, wall = self._clock(), self._wall()
        return [
            {
                "model": model,
                "until": round(wall + until - now, 3),
                "seconds_left": round(until - now, 3),
            }
            for model, until in scopes[:MAX_LISTED_SCOPES]
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
