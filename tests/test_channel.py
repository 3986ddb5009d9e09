"""The guarded connection, over real sockets: clients that stop reading (the write timeout),
pipelined local routes, and clients that hang up while the upstream works.

Each protection is checked with two clients: the one that trips it, and one that must not
notice. Timeouts are set short; outcomes are asserted, never how long they took.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from clocks import wait_until
from harness import running
from upstream_fakes import LoopbackListener, chat_chunk, sse_response
from werkzeug import Request, Response

from apirouter.server import channel

CHAT = "/v1/chat/completions"
FILE = "/v1/files/file-1/content"
MiB = 1024 * 1024


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    """A client socket; a small receive buffer makes a non-reader stall sooner."""
    parts = urlsplit(url)
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((parts.hostname, parts.port))
    return sock


def closed_by_router(sock: socket.socket) -> bool:
    """Whether the router has closed ``sock``: what it sent before is drained, then EOF
    (or a reset) must follow; a connection still open times out instead."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


def total(router, name: str) -> float:
    """A counter summed over all its labels."""
    return sum(
        sample.value
        for metric in router.app.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


def stalled(router, route: str) -> float:
    labels = {"route": route, "reason": "client_stalled"}
    return router.sample("apirouter_client_disconnects_total", labels)


# --- the write timeout -----------------------------------------------------------------------


def test_a_client_that_stops_reading_a_large_answer_is_disconnected_and_its_slot_freed(
    make_router, httpserver
):
    router = make_router(max_concurrent=1, write_timeout=0.5)
    httpserver.expect_request(FILE).respond_with_data(b"x" * (32 * MiB))
    request = f"GET {FILE} HTTP/1.1\r\nHost: r\r\n\r\n".encode()
    with connect(router.url, receive_buffer=4096) as stalling:
        stalling.sendall(request)
        wait_until(lambda: router.app.capacity.snapshot()["in_flight"] == 1)
        # the other client does not notice: the router answers it meanwhile
        assert httpx.get(router.url + "/health", timeout=5).status_code == 200
        wait_until(lambda: stalled(router, "/v1/files/{id}/content") == 1, timeout=10)
        assert closed_by_router(stalling)
    assert router.app.capacity.snapshot()["in_flight"] == 0  # the slot is free at once
    assert total(router, "apirouter_upstream_errors_total") == 0
    with httpx.stream("GET", router.url + FILE, timeout=10) as response:
        assert response.status_code == 200  # the next client gets the freed slot
        assert sum(len(chunk) for chunk in response.iter_raw()) == 32 * MiB


def test_a_stream_silent_for_longer_than_the_write_timeout_is_not_cut(make_router, httpserver):
    router = make_router(write_timeout=0.3, read_timeout=30)

    def quiet(request: Request) -> Response:
        def events() -> Iterator[bytes]:
            yield chat_chunk("before")
            time.sleep(1.5)  # the upstream's silence is the scenario, not a synchronisation
            yield chat_chunk("after")
            yield b"data: [DONE]\n\n"

        return sse_response(events())

    httpserver.expect_request(CHAT).respond_with_handler(quiet)
    response = httpx.post(router.url + CHAT, json={"model": "m", "stream": True}, timeout=10)
    assert response.status_code == 200
    assert b"after" in response.content and response.content.endswith(b"data: [DONE]\n\n")
    assert stalled(router, CHAT) == 0


# --- pipelined local routes --------------------------------------------------------------------


def pipelined(path: str, count: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: r\r\n\r\n".encode() * count


@contextmanager
def non_readers(url: str, count: int, path: str = "/metrics") -> Iterator[list[socket.socket]]:
    """``count`` connections that each pipeline 2,000 requests and never read an answer
    (more answers than the kernel's socket buffers take)."""
    sockets = [connect(url, receive_buffer=4096) for _ in range(count)]
    try:
        for sock in sockets:
            sock.sendall(pipelined(path, 2000))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_pipelined_metrics_never_read_pin_no_worker(make_router, httpserver):
    httpserver.expect_request(CHAT).respond_with_json({"choices": []})
    router = make_router(write_timeout=0.5)
    with running(router.app, threads=2) as (http_server, _):
        url = channel.listen_urls(http_server)[0]
        with non_readers(url, 6) as sockets:
            # two workers, six connections that once pinned them: others are still served
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            assert httpx.post(url + CHAT, json={"model": "m"}, timeout=5).status_code == 200
            wait_until(lambda: stalled(router, "/metrics") == 6, timeout=15)
            assert all(closed_by_router(sock) for sock in sockets)


def test_at_most_eight_pipelined_requests_are_queued_per_connection(make_router, httpserver):
    """Behind a request that waits on its upstream, 239 pipelined ones: 7 are parsed and
    queued, the rest of the bytes are held unparsed. A client that reads then gets all 240
    answers, in order, on the one connection."""
    release = threading.Event()

    def held(request: Request) -> Response:
        release.wait(10)
        return Response(json.dumps({"choices": []}), content_type="application/json")

    httpserver.expect_request(CHAT).respond_with_handler(held)
    router = make_router()
    with (
        running(router.app) as (http_server, _),
        connect(channel.listen_urls(http_server)[0]) as reader,
    ):
        reader.sendall(chat_request() + pipelined("/health/ready", 238) + pipelined("/health", 1))

        def queued() -> channel.GuardedChannel | None:
            found = [c for c in http_server.active_channels.values() if c.held is not None]
            return found[0] if found else None

        connection = wait_until(queued)
        assert len(connection.requests) == channel.PIPELINE_DEPTH == 8
        release.set()
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < 240:
            chunk = reader.recv(1 << 20)
            assert chunk
            received += chunk
    answers = received.split(b"HTTP/1.1 200 OK")[1:]
    assert b'"choices"' in answers[0] and b'"ready": true' in answers[1]
    assert b'"status": "ok"' in answers[-1]


def test_the_admin_port_keeps_answering_probes_past_pipelining_non_readers(make_router, httpserver):
    router = make_router(admin_port=0, write_timeout=0.5)
    with running(router.app) as (http_server, _):
        admin = http_server.admin.url
        with non_readers(admin, 4):  # the admin port has two workers
            for path in ("/health", "/health/ready", "/metrics"):
                assert httpx.get(admin + path, timeout=5).status_code == 200
            wait_until(lambda: stalled(router, "/metrics") == 4, timeout=15)


# --- hang-ups --------------------------------------------------------------------------------


class SlowUpstream(LoopbackListener):
    """A raw-socket upstream that reads a request and answers only when told; it notes when
    the router closes a connection it is holding."""

    def __init__(self, first: bytes = b"") -> None:
        self.first = first  # sent at once (the start of a stream), then silence
        self.holding = threading.Semaphore(0)
        self.closed = threading.Event()
        self.answer = threading.Event()
        self.url = f"http://127.0.0.1:{self.listen()}/v1"

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(self.first)
            self.holding.release()
            conn.settimeout(0.05)
            while not self.answer.is_set():
                try:
                    if conn.recv(1) == b"":
                        self.closed.set()  # the router hung up on us
                        return
                except TimeoutError:
                    continue
                except OSError:
                    self.closed.set()
                    return
            body = json.dumps({"choices": []}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    def close(self) -> None:
        self.answer.set()
        self.listener.close()


@pytest.fixture
def slow_upstream() -> Iterator[SlowUpstream]:
    upstream = SlowUpstream()
    yield upstream
    upstream.close()


def chat_request() -> bytes:
    body = b'{"model": "m"}'
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_client_hanging_up_on_a_plain_request_stops_the_upstream_request(
    make_router, slow_upstream, how
):
    router = make_router({"baseUrl": slow_upstream.url, "retry": {"maxAttempts": 1}})
    patient = threading.Thread(
        target=lambda: results.append(
            httpx.post(router.url + CHAT, json={"model": "m"}, timeout=10).status_code
        )
    )
    results: list[int] = []
    patient.start()
    assert slow_upstream.holding.acquire(timeout=10)  # the patient client's request waits
    leaving = connect(router.url)
    leaving.sendall(chat_request())
    assert slow_upstream.holding.acquire(timeout=10)  # and so does the leaving one's
    hung_up_at = time.monotonic()
    if how == "close":
        leaving.close()
    else:
        leaving.shutdown(socket.SHUT_WR)  # documented: a half-close counts as gone
    assert slow_upstream.closed.wait(10), "the upstream request kept running"
    took = time.monotonic() - hung_up_at  # measured (about a millisecond), never asserted
    print(f"upstream saw the hang-up after {took * 1000:.1f} ms")
    slow_upstream.answer.set()
    patient.join(10)
    assert results == [200]  # the other client did not notice
    labels = {"route": CHAT, "reason": "client_disconnected"}
    wait_until(lambda: router.sample("apirouter_client_disconnects_total", labels) == 1)
    assert total(router, "apirouter_upstream_errors_total") == 0
    if how == "half-close":
        leaving.close()


def test_a_client_hanging_up_on_a_quiet_stream_stops_the_upstream_at_once(make_router):
    """No event to write, so no failed write to notice it by: the main loop's EOF does."""
    event = b'data: {"choices": []}\n\n'
    upstream = SlowUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
    )
    try:
        router = make_router(
            {"baseUrl": upstream.url, "streamConfig": {"heartbeatIntervalSecs": 3600}}
        )
        with httpx.stream(
            "POST", router.url + CHAT, json={"model": "m", "stream": True}, timeout=10
        ) as response:
            chunks = response.iter_raw()
            assert next(chunks) == event
        assert upstream.closed.wait(10), "the upstream stream kept running"
        labels = {"route": CHAT, "reason": "client_disconnected"}
        wait_until(lambda: router.sample("apirouter_client_disconnects_total", labels) == 1)
        assert total(router, "apirouter_upstream_errors_total") == 0
    finally:
        upstream.close()
