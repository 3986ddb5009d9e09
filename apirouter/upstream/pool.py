"""The upstream connection pool: httpcore's, with bookkeeping that stays cheap at 1,000
connections.

httpcore re-examines every pooled connection each time a request starts or ends, and for
every idle one counts the whole pool again: quadratic work that took half the router's CPU
while 1,000 streams started at once (each check of an idle connection is also a ``poll``
system call), and again as they ended. Its count also takes every connection for an idle
one, so past ``max_keepalive`` connections in all, each connection that fell idle was
closed instead of kept for the next request.

Here a request's connection is noted when the request ends (it may now be idle), and the
next request to the same origin takes the most recently noted one that is still usable,
checking only that one. Idle connections beyond ``max_keepalive`` are closed as they fall
idle, the oldest first; expired and closed ones are swept out once a ``SWEEP_SECONDS``.
Requests never wait for a connection: there is no connection cap (the capacity gate is
the cap, see ``apirouter.upstream.client``), so each is given one at once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpcore

from apirouter.upstream import hangup
from apirouter.upstream.httpcore_internals import PoolBase

SWEEP_SECONDS = 1.0


class _Requests(list[Any]):
    """The pool's list of requests in flight, telling the pool which connection a request
    held when it is removed (when its response is closed, or it failed)."""

    def __init__(self, on_removed: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_removed = on_removed

    def remove(self, request: Any) -> None:
        super().remove(request)
        if request.connection is not None:
            self._on_removed(request)


class LeanPool(PoolBase):
    """httpcore's pool with O(1) work per request (plus a sweep a second)."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.setdefault("max_connections", None) is not None:
            raise ValueError("LeanPool never makes a request wait: max_connections must be None")
        super().__init__(**kwargs)
        self.requests = _Requests(self._released)
        self._reusable: defaultdict[tuple[bytes, bytes, int], list[Any]] = defaultdict(list)
        self._idle: dict[Any, None] = {}  # released and usable, oldest first
        self._to_close: list[Any] = []  # closed by the next call that may do I/O
        self._next_sweep = 0.0

    def _released(self, request: Any) -> None:
        """A request ended (under the pool's lock): its connection may be reused, so the
        request's hang-up must no longer shut it."""
        hangup.release_current()
        connection = request.connection
        self._reusable[_key(request.request.url.origin)].append(connection)
        if connection.is_available():
            self._idle.pop(connection, None)
            self._idle[connection] = None
            while len(self._idle) > self.max_keepalive:  # the oldest go
                oldest = next(iter(self._idle))
                self._drop(oldest, self._to_close)

    def assign_requests_to_connections(self) -> list[Any]:
        closing, self._to_close = self._to_close, []
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            closing += self._sweep()
        for request in [r for r in self.requests if r.connection is None]:
            origin = request.request.url.origin
            connection = self._reusable_connection(origin, closing)
            if connection is None:
                connection = self.create_connection(origin)
                self.connections.append(connection)
            request.assign_to_connection(connection)
        return closing

    def _reusable_connection(self, origin: Any, closing: list[Any]) -> Any:
        """The most recently released usable connection to ``origin``, if any."""
        candidates = self._reusable.get(_key(origin))
        while candidates:
            connection = candidates.pop()
            if connection.is_available():  # idle, so has_expired also polls the socket
                if not connection.has_expired():
                    self._idle.pop(connection, None)
                    return connection
                self._drop(connection, closing)
            elif connection.is_closed():
                self._drop(connection, closing)
        return None

    def _drop(self, connection: Any, closing: list[Any]) -> None:
        self._idle.pop(connection, None)
        if connection in self.connections:
            self.connections.remove(connection)
            closing.append(connection)

    def _sweep(self) -> list[Any]:
        """Remove closed and expired connections, and idle ones beyond the keep-alive
        limit (the oldest go first); forget what was noted of connections now gone. A
        connection already given to a request counts as busy, even before it is used."""
        closing: list[Any] = []
        kept: list[Any] = []
        idle: list[Any] = []
        held = {id(r.connection) for r in self.requests if r.connection is not None}
        for connection in self.connections:
            if connection.is_closed():
                continue
            if id(connection) in held:
                kept.append(connection)
            elif connection.has_expired():
                closing.append(connection)
            elif connection.is_idle():
                idle.append(connection)
            else:
                kept.append(connection)
        surplus = max(0, len(idle) - self.max_keepalive)
        closing += idle[:surplus]
        idle = idle[surplus:]
        self.connections = kept + idle
        self._idle = {connection: None for connection in idle}
        alive = set(self.connections)
        for origin, candidates in list(self._reusable.items()):
            candidates[:] = [c for c in dict.fromkeys(candidates) if c in alive]
            if not candidates:
                del self._reusable[origin]
        return closing


def _key(origin: httpcore.Origin) -> tuple[bytes, bytes, int]:
    """httpcore's Origin compares equal but does not hash."""
    return origin.scheme, origin.host, origin.port
