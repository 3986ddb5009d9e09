"""Parks and cool-downs of one model on one upstream: the scope a 429 or a model's 5xx has.

A 429 on an operator key says "this key may not send *this model* here for a while"; a
503 for one overloaded model says nothing about the provider's other models. So both act
on an (upstream, model) scope, and requests for other models keep flowing. A scope with
model ``None`` is the whole upstream (a 429 on a route without a model).

Both are *soft*: ``Breakers.choose`` skips a blocked scope only when another target can
take the request, so the router never answers 503 for what the provider answered 429.

Per process, as breakers are (fleet mode shares neither). Memory is bounded: at most
``MAX_MODELS`` scopes per upstream, least recently used first out; when every one of them
is active, a new model shares the ``other`` scope. Not thread-safe by itself: the caller
(``Breakers``) holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_MODELS = 256
OTHER = "other"


@dataclass
class _Scope:
    parked_until: float = 0.0  # a 429's Retry-After (capped)
    cooling_until: float = 0.0  # the model's own cool-down after a full failure window
    pause: float = 0.0  # the current cool-down; doubles while the failures continue
    failures: deque[float] = field(default_factory=deque)  # times in the failure window

    def active(self, now: float, window: float) -> bool:
        recent = bool(self.failures) and self.failures[-1] > now - window
        return recent or self.parked_until > now or self.cooling_until > now


class ScopeTable:
    """``threshold`` failures of one model within ``window_seconds`` cool it down (the
    alert window's settings: one threshold for operators to reason about)."""

    def __init__(self, threshold: int = 5, window_seconds: float = 300.0) -> None:
        self.threshold = threshold
        self.window_seconds = window_seconds
        self._upstreams: dict[str, OrderedDict[str | None, _Scope]] = {}

    # --- what attempts and the reporter tell us ----------------------------------------------

    def park(self, key: str, model: str | None, until: float, now: float) -> None:
        scope = self._scope(key, model, now)
        scope.parked_until = max(scope.parked_until, until)

    def failed(self, key: str, model: str | None, now: float) -> bool:
        """Count a failure of a model (None: of the whole upstream); True when its window
        holds ``threshold`` failures."""
        scope = self._scope(key, model, now)
        failures = scope.failures
        failures.append(now)
        while failures and (
            failures[0] <= now - self.window_seconds or len(failures) > self.threshold
        ):
            failures.popleft()
        return len(failures) >= self.threshold

    def cool(self, key: str, model: str, now: float, initial: float, maximum: float) -> None:
        """Cool a model down; while it keeps failing right after a pause, the pause doubles."""
        scope = self._scope(key, model, now)
        if scope.cooling_until > now:
            return  # failures of requests already in flight do not stretch the pause
        scope.pause = min(scope.pause * 2, maximum) if scope.pause else initial
        scope.cooling_until = now + scope.pause

    def succeeded(self, key: str, model: str | None) -> None:
        """A model answered: its next cool-down starts from the initial pause again."""
        scopes = self._upstreams.get(key)
        scope = scopes.get(_bounded(scopes, model)) if scopes else None
        if scope is not None and scope.pause:
            scope.pause = 0.0

    def holds(self, key: str) -> bool:
        """Has this upstream any scope at all? (a lock-free check for the common path)"""
        return bool(self._upstreams.get(key))

    # --- what choosing, /health and /metrics read -----------------------------------------

    def blocked(self, key: str, model: str | None, now: float) -> bool:
        """Is this model, or the whole upstream, parked or cooling down?"""
        scopes = self._upstreams.get(key)
        if not scopes:
            return False
        for name in {None, _bounded(scopes, model)}:
            scope = scopes.get(name)
            if scope is not None and (scope.parked_until > now or scope.cooling_until > now):
                return True
        return False

    def parked(self, key: str, now: float) -> list[tuple[str | None, float]]:
        """(model, until) of each parked scope of this upstream, soonest first."""
        live = self._live(key, now, "parked_until")
        return sorted(((m, s.parked_until) for m, s in live), key=lambda item: item[1])

    def cooling(self, key: str, now: float) -> list[tuple[str | None, float]]:
        """(model, until) of each model cooling down on this upstream, soonest first."""
        live = self._live(key, now, "cooling_until")
        return sorted(((m, s.cooling_until) for m, s in live), key=lambda item: item[1])

    def _live(self, key: str, now: float, attribute: str) -> Iterator[tuple[str | None, _Scope]]:
        for model, scope in list(self._upstreams.get(key, {}).items()):
            if getattr(scope, attribute) > now:
                yield model, scope

    def _scope(self, key: str, model: str | None, now: float) -> _Scope:
        scopes = self._upstreams.setdefault(key, OrderedDict())
        if model in scopes:
            scopes.move_to_end(model)
            return scopes[model]
        if len(scopes) >= MAX_MODELS:
            window = self.window_seconds
            idle = next((m for m, s in scopes.items() if not s.active(now, window)), OTHER)
            if idle == OTHER:  # every scope is active: the newcomer shares "other"
                return scopes.setdefault(OTHER, _Scope())
            del scopes[idle]
        return scopes.setdefault(model, _Scope())


def _bounded(scopes: OrderedDict[str | None, _Scope], model: str | None) -> str | None:
    """The scope a model's state lives in: its own, else (table full) ``other``."""
    if model is None or model in scopes or len(scopes) < MAX_MODELS:
        return model
    return OTHER
