"""HTTP/1.1 hardening in the router's own request parser, over a real socket: body limits
applied from the request line and headers, before the body is read."""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from harness import write_config
from waitress.adjustments import Adjustments

from apirouter.server.protocol import MIN_FEED, StrictRequestParser

EMBEDDINGS = "/v1/embeddings"
LIMIT = 1000
MiB = 1024 * 1024


@pytest.fixture
def router(make_router, httpserver):
    httpserver.expect_request(EMBEDDINGS).respond_with_json({"data": []})
    return make_router({"endpoints": {EMBEDDINGS: {"maxBodyBytes": LIMIT}}}, max_body_bytes=2000)


def connect(router) -> socket.socket:
    parts = urlsplit(router.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def head(path: str, *lines: str) -> bytes:
    fields = [f"POST {path} HTTP/1.1", "Host: router", "Content-Type: application/json", *lines]
    return ("\r\n".join(fields) + "\r\n\r\n").encode()


def read_until_closed(conn: socket.socket) -> bytes:
    """What the router sent until it closed. A router closing with body bytes unread
    resets the connection (RST) after its answer: that counts as closed."""
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def assert_early_413(response: bytes) -> None:
    """A 413 in the OpenAI error shape, closing the connection (and nothing before it)."""
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", response[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers and b"Content-Type: application/json" in headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == "payload_too_large"
    assert f"limit of {LIMIT} bytes" in error["message"]


def test_a_declared_body_over_the_route_limit_is_refused_before_a_byte_of_it_is_sent(
    router, httpserver
):
    with connect(router) as conn:
        conn.sendall(head(EMBEDDINGS, f"Content-Length: {200 * MiB}"))  # and no body at all
        assert_early_413(read_until_closed(conn))
    # another client on the same router does not notice
    ok = httpx.post(router.url + EMBEDDINGS, json={"model": "m", "input": "x" * 800})
    assert ok.status_code == 200
    assert len(httpserver.log) == 1  # the refused one never reached the upstream


def test_expect_100_continue_over_the_limit_gets_the_413_never_a_100(router):
    with connect(router) as conn:
        conn.sendall(head(EMBEDDINGS, f"Content-Length: {200 * MiB}", "Expect: 100-continue"))
        response = read_until_closed(conn)
    assert b"100 Continue" not in response
    assert_early_413(response)


def test_expect_100_continue_within_the_limit_still_gets_its_100(router):
    body = json.dumps({"model": "m", "input": "hello"}).encode()
    with connect(router) as conn:
        conn.sendall(head(EMBEDDINGS, f"Content-Length: {len(body)}", "Expect: 100-continue"))
        assert conn.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(body)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("sent", [LIMIT + 1, 64 * 1024])
def test_a_chunked_body_is_cut_at_limit_plus_one(router, sent):
    """The client sends ``sent`` bytes of a 150 MiB chunked body, then waits: the 413
    arrives without the rest, so the router stopped within what was sent."""
    with connect(router) as conn:
        conn.sendall(head(EMBEDDINGS, "Transfer-Encoding: chunked"))
        conn.sendall(b"%x\r\n" % (150 * MiB) + b"x" * sent)
        assert_early_413(read_until_closed(conn))
    ok = httpx.post(router.url + EMBEDDINGS, json={"model": "m"})
    assert ok.status_code == 200


def test_a_path_no_template_matches_is_limited_by_the_default(router):
    with connect(router) as conn:
        conn.sendall(head("/v1/nowhere", "Content-Length: 2001"))
        response = read_until_closed(conn)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"limit of 2000 bytes" in response


def test_the_limit_comes_from_the_current_hot_reloaded_config(router):
    document = json.loads(router.config_path.read_text())
    document["endpoints"][EMBEDDINGS]["maxBodyBytes"] = 5000
    write_config(router.config_path, document)
    stat = router.config_path.stat()
    os.utime(router.config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert router.app.store.reload_if_changed()
    body = json.dumps({"model": "m", "input": "x" * 3000}).encode()
    response = httpx.post(
        router.url + EMBEDDINGS, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200


def test_no_chunked_request_spools_more_than_its_route_limit():
    """Fed a whole 150 KiB chunked body in one buffer, as one recv could deliver it, the
    parser never decodes (spools) more than limit + MIN_FEED bytes, and drops them."""
    parser = StrictRequestParser(Adjustments(), body_limit=lambda target: LIMIT)
    data = head(EMBEDDINGS, "Transfer-Encoding: chunked") + b"%x\r\n" % (150 * 1024)
    data += b"x" * 150 * 1024
    decoded = []
    while data and not parser.completed:  # as waitress's channel feeds its parser
        consumed = parser.received(data)
        if parser.body_rcv is not None:
            decoded.append(len(parser.body_rcv))
        data = data[consumed:]
    assert parser.refused and parser.error.code == 413
    assert max(decoded) <= LIMIT + MIN_FEED
    assert data == b""  # the rest was dropped, never parsed as a next request
