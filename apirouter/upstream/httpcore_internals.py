"""httpcore's private names, reached from here only (see ``apirouter.private``).

- The connection pool's bookkeeping (``_requests``, ``_connections``,
  ``_max_keepalive_connections``, ``_ssl_context``) and its one step that assigns
  requests to connections (``_assign_requests_to_connections``): ``pool.LeanPool``
  replaces that step, whose quadratic cost took half the router's CPU at a thousand
  streams. ``PoolBase`` gives them public names.
- A pooled request (``PoolRequest``: ``request``, ``connection``,
  ``assign_to_connection``), which that step hands connections to.
- From a response stream down to its connection's h11 state (``PoolByteStream._stream``,
  ``HTTP11ConnectionByteStream._connection``, ``HTTP11Connection._h11_state``), for
  ``chunked`` to read the body off the socket with h11 keeping the connection's state.
"""

from __future__ import annotations

from typing import Any

import h11
import httpcore
from httpcore._sync.connection_pool import PoolByteStream, PoolRequest
from httpcore._sync.http11 import HTTP11Connection, HTTP11ConnectionByteStream

from apirouter.private import PrivateName

_Pool = httpcore.ConnectionPool
PRIVATE_NAMES = (
    PrivateName(_Pool, "_requests", "requests in flight", on_instances=True),
    PrivateName(_Pool, "_connections", "the pooled connections", on_instances=True),
    PrivateName(_Pool, "_max_keepalive_connections", "the idle limit", on_instances=True),
    PrivateName(_Pool, "_ssl_context", "the TLS context to keep", on_instances=True),
    PrivateName(_Pool, "_assign_requests_to_connections", "the step LeanPool replaces"),
    PrivateName(PoolRequest, "request", "the request's origin", on_instances=True),
    PrivateName(PoolRequest, "connection", "the connection it holds", on_instances=True),
    PrivateName(PoolRequest, "assign_to_connection", "handing it a connection"),
    PrivateName(PoolByteStream, "_stream", "the connection's stream", on_instances=True),
    PrivateName(HTTP11ConnectionByteStream, "_connection", "its connection", on_instances=True),
    PrivateName(HTTP11Connection, "_h11_state", "its h11 state", on_instances=True),
)


class PoolBase(httpcore.ConnectionPool):
    """httpcore's pool with public names for the bookkeeping a subclass replaces."""

    @property
    def requests(self) -> list[Any]:
        """The pooled requests in flight (``PoolRequest``s)."""
        requests: list[Any] = self._requests
        return requests

    @requests.setter
    def requests(self, requests: list[Any]) -> None:
        self._requests = requests

    @property
    def connections(self) -> list[Any]:
        connections: list[Any] = self._connections
        return connections

    @connections.setter
    def connections(self, connections: list[Any]) -> None:
        self._connections = connections

    @property
    def max_keepalive(self) -> int:
        return int(self._max_keepalive_connections)

    def _assign_requests_to_connections(self) -> list[Any]:
        return self.assign_requests_to_connections()

    def assign_requests_to_connections(self) -> list[Any]:
        """Give each waiting request a connection; return the connections to close."""
        closing: list[Any] = httpcore.ConnectionPool._assign_requests_to_connections(self)
        return closing


def pool_ssl_context(pool: httpcore.ConnectionPool) -> Any:
    """The TLS context ``pool`` was built with (httpx's, with its certificate settings)."""
    return pool._ssl_context


def h11_connection(stream: Any) -> h11.Connection | None:
    """The h11 state machine under httpcore's response ``stream``, when it is an HTTP/1.1
    connection's stream from the pool."""
    inner = getattr(stream, "_stream", None)
    connection = getattr(inner, "_connection", None)
    state = getattr(connection, "_h11_state", None)
    return state if isinstance(state, h11.Connection) else None
