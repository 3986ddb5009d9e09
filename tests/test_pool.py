"""The upstream connection pool keeps idle connections for reuse however many are busy,
never reuses one the upstream has closed, and keeps its bookkeeping per request small."""

from __future__ import annotations

import httpx
from upstream_fakes import RawUpstream

from apirouter import pool
from apirouter.upstream import Upstream

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def start(upstream: Upstream, url: str) -> httpx.Response:
    """A request whose response stays open (its connection busy) until closed."""
    return upstream.send("POST", url, {"content-type": "application/json"}, b"{}")


def finish(response: httpx.Response) -> None:
    assert response.read() == b"{}"
    response.close()


def test_idle_connections_are_reused_while_more_than_the_keepalive_limit_are_busy():
    """httpcore counts every connection as idle when deciding what to keep: past the
    keep-alive limit in all, each connection that fell idle was closed at once."""
    raw = RawUpstream(ANSWER)
    upstream = Upstream(connect_timeout=5, read_timeout=5, keepalive_connections=10)
    try:
        busy = [start(upstream, raw.url) for _ in range(20)]
        for response in busy[:5]:
            finish(response)
        again = [start(upstream, raw.url) for _ in range(5)]
        for response in busy[5:] + again:
            finish(response)
        assert raw.connections == 20
    finally:
        upstream.close()
        raw.close()


def test_a_connection_the_upstream_closed_while_idle_is_not_reused():
    raw = RawUpstream(ANSWER, hang_up=True)
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    try:
        finish(start(upstream, raw.url))
        assert raw.closed.wait(5)
        finish(start(upstream, raw.url))  # no ReadError: a fresh connection was used
        assert raw.connections == 2
    finally:
        upstream.close()
        raw.close()


def test_the_sweep_keeps_at_most_the_keepalive_limit_of_idle_connections(monkeypatch):
    raw = RawUpstream(ANSWER)
    upstream = Upstream(connect_timeout=5, read_timeout=5, keepalive_connections=3)
    monkeypatch.setattr(pool, "SWEEP_SECONDS", 0.0)  # sweep on every request
    try:
        responses = [start(upstream, raw.url) for _ in range(8)]
        for response in responses:
            finish(response)
        finish(start(upstream, raw.url))  # the sweep runs as this one starts
        connections = upstream.client._transport._pool.connections
        assert sum(c.is_idle() for c in connections) <= 3
        assert raw.connections == 8  # and the last request reused one of them
    finally:
        upstream.close()
        raw.close()
