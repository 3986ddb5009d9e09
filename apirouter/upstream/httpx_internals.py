"""httpx's private names, reached from here only (see ``apirouter.private``).

- ``HTTPTransport._pool``: httpx offers no public way to choose the network backend or
  the pool, so ``client.WatchedTransport`` replaces the pool it built (keeping its TLS
  context) with ``pool.LeanPool`` over a ``WatchedBackend``.
- ``BoundSyncStream._stream`` and ``ResponseStream._httpcore_stream``: the way from an
  httpx response down to httpcore's stream, for ``chunked`` to read a body straight off
  the socket (five generator layers fewer per relayed piece).
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx
from httpx._client import BoundSyncStream
from httpx._transports.default import ResponseStream

from apirouter.private import PrivateName

PRIVATE_NAMES = (
    PrivateName(httpx.HTTPTransport, "_pool", "the pool it sends through", on_instances=True),
    PrivateName(BoundSyncStream, "_stream", "the transport's stream", on_instances=True),
    PrivateName(ResponseStream, "_httpcore_stream", "httpcore's stream", on_instances=True),
)


def transport_pool(transport: httpx.HTTPTransport) -> httpcore.ConnectionPool:
    pool: httpcore.ConnectionPool = transport._pool
    return pool


def replace_transport_pool(transport: httpx.HTTPTransport, pool: httpcore.ConnectionPool) -> None:
    transport._pool = pool


def httpcore_stream(response: httpx.Response) -> Any:
    """httpcore's stream under ``response``'s body, or None when it came another way (a
    test transport, a mounted one)."""
    bound = getattr(response.stream, "_stream", None)
    return getattr(bound, "_httpcore_stream", None)
