"""The server's main loop (``server/mainloop.py``): one epoll set kept for the loop's life,
told only what changed, over real sockets.

What it must keep from waitress's own turn: every connection watched for what its
``readable()`` and ``writable()`` say, a socket number reused by a new connection watched
afresh, and a closed connection forgotten without disturbing the others.
"""

from __future__ import annotations

import http.client
import itertools
import socket
from urllib.parse import urlsplit

import httpx
from harness import running

from apirouter.server import channel, mainloop

CHAT = "/v1/chat/completions"


def get_once(url: str, path: str) -> int:
    """One request on a keep-alive connection of its own, which the client then closes:
    the router sees the EOF while the connection waits to read, as most connections end."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_connections_on_reused_socket_numbers_are_served_and_a_kept_one_is_undisturbed(
    make_router, httpserver
):
    """Sixty connections opened and closed one after another reuse the server's socket
    numbers; each must be watched afresh (a stale entry would leave it unanswered), while
    a keep-alive client served throughout notices nothing."""
    httpserver.expect_request(CHAT).respond_with_json({"choices": []})
    router = make_router()
    with running(router.app, threads=4) as (http_server, _):
        url = channel.listen_urls(http_server)[0]
        with httpx.Client(base_url=url, timeout=10) as kept:
            for _ in range(60):
                assert get_once(url, "/health") == 200
                assert kept.post(CHAT, json={"model": "m"}).status_code == 200


def readiness(conn: channel.GuardedChannel) -> int:
    """What waitress's two questions say, as poll events."""
    readable = mainloop.READ if conn.readable() else 0
    return readable | (mainloop.WRITE if conn.writable() else 0)


def test_poll_events_say_what_readable_and_writable_say(make_router):
    """``poll_events`` writes waitress's conditions out for speed: it must agree with the
    methods in every state a connection can be in (held bytes only with a request queued,
    where ``readable`` only answers and parses nothing)."""
    router = make_router()
    server = channel.build_server(
        router.app, "127.0.0.1", 0, 1, 10, 30.0, lambda: None, body_limit=lambda _: 1000
    )
    ours, theirs = socket.socketpair()
    try:
        conn = channel.GuardedChannel(server, ours, ("127.0.0.1", 1), server.adj, map={})
        lookahead = server.adj.channel_request_lookahead
        states = itertools.product(
            (False, True),  # will_close
            (False, True),  # close_when_flushed
            (0, 10),  # total_outbufs_len
            (0, 1, lookahead, lookahead + 1),  # requests queued
            (False, True),  # worker_writing
            (None, bytearray(b"GET / HTTP/1.1\r\n")),  # held
        )
        seen = set()
        for will_close, flushed, unsent, queued, writing, held in states:
            if held is not None and not queued:
                continue
            conn.will_close, conn.close_when_flushed = will_close, flushed
            conn.total_outbufs_len, conn.worker_writing, conn.held = unsent, writing, held
            conn.requests = [object()] * queued
            state = (will_close, flushed, unsent, queued, writing, held is not None)
            assert conn.poll_events() == readiness(conn), state
            seen.add(conn.poll_events())
        assert seen == {0, mainloop.READ, mainloop.WRITE}  # never both: unsent bytes go first
    finally:
        theirs.close()
        channel.close_server(server)


def test_requests_on_a_kept_connection_need_no_wake_up_and_a_closing_answer_gets_one(
    make_router, monkeypatch
):
    """A connection that stays open and only to be read after its answer is already
    watched that way: waking the main loop for it (waitress's habit after every request)
    is skipped. An answer that closes its connection still wakes the loop, which does the
    closing."""
    router = make_router()
    with running(router.app, threads=2) as (http_server, _):
        url = channel.listen_urls(http_server)[0]
        wakes: list[None] = []
        pull = http_server.trigger.pull_trigger
        monkeypatch.setattr(http_server.trigger, "pull_trigger", lambda: wakes.append(pull()))
        with httpx.Client(base_url=url, timeout=10) as kept:
            assert all(kept.get("/health").status_code == 200 for _ in range(20))
            assert wakes == []
        # asked to close, the router closes (the client waits for EOF): the loop is woken
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # until the router closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert len(wakes) >= 1
