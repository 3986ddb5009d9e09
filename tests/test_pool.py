"""The upstream connection pool keeps idle connections for reuse however many are busy,
never reuses one the upstream has closed, and keeps its bookkeeping per request small."""

from __future__ import annotations

import httpx
from upstream_fakes import RawUpstream

from apirouter.upstream.client import Upstream

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


def test_idle_connections_beyond_the_keepalive_limit_close_as_they_fall_idle():
    """Not at the next sweep: after a burst the router may stay quiet for long."""
    raw = RawUpstream(ANSWER)
    upstream = Upstream(connect_timeout=5, read_timeout=5, keepalive_connections=3)
    try:
        responses = [start(upstream, raw.url) for _ in range(8)]
        for response in responses:
            finish(response)
        connections = upstream.client._transport._pool.connections
        assert len(connections) == 3 and all(c.is_idle() for c in connections)
        finish(start(upstream, raw.url))
        assert raw.connections == 8  # the last request reused one of the three
    finally:
        upstream.close()
        raw.close()


def test_the_sweep_never_closes_a_connection_given_to_a_request_not_yet_sent(monkeypatch):
    """Between being given a connection and sending on it, a request's connection still
    looks idle; closing it then would fail that request with a bad file descriptor."""
    raw = RawUpstream(ANSWER)
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    lean = upstream.client._transport._pool
    try:
        finish(start(upstream, raw.url))
        (connection,) = lean.connections
        monkeypatch.setattr(connection, "has_expired", lambda: True)  # as if it had expired
        waiting = type("PoolRequest", (), {"connection": connection})()
        lean._requests.append(waiting)  # given to a request whose thread has not sent yet
        assert lean._sweep() == [] and lean.connections == [connection]
        list.remove(lean._requests, waiting)
        assert lean._sweep() == [connection]  # once nobody holds it, it goes
    finally:
        upstream.close()
        raw.close()
