"""The upstream client's own socket I/O: the request it builds, a request's head and body
sent together, and timeouts kept by the kernel (``WatchedStream``), over loopback."""

from __future__ import annotations

import socket

import httpcore
import httpx
import pytest
from werkzeug import Request, Response

from apirouter import errors
from apirouter.upstream import client as upstream
from apirouter.upstream.client import Upstream, WatchedStream


class RecordingStream(httpcore.NetworkStream):
    """httpcore's side of a connection, recording what would go on the wire."""

    def __init__(self, answer: bytes = b"") -> None:
        self.writes: list[bytes] = []
        self.answer = answer

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.answer

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append(buffer)

    def close(self) -> None:
        pass


def test_a_request_head_leaves_with_its_body_in_one_write():
    inner = RecordingStream()
    stream = WatchedStream(inner, direct=False)
    stream.write(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
    assert inner.writes == []  # held for its body
    stream.write(b"{}")
    stream.write(b"")  # h11's end of a body of known length
    assert inner.writes == [b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"]


def test_a_held_head_goes_out_before_any_read_and_large_pieces_go_alone():
    inner = RecordingStream(answer=b"HTTP/1.1 200 OK\r\n")
    stream = WatchedStream(inner, direct=False)
    stream.write(b"GET / HTTP/1.1\r\n\r\n")
    assert stream.read(100) == b"HTTP/1.1 200 OK\r\n"
    assert inner.writes == [b"GET / HTTP/1.1\r\n\r\n"]  # sent before waiting for the answer

    stream.write(b"POST / HTTP/1.1\r\n\r\n")  # after a read: the next request's head
    large = b"x" * upstream.HEAD_HELD_BYTES
    stream.write(large)
    stream.write(b"more")  # a streamed body's later piece goes as it comes
    assert inner.writes[1:] == [b"POST / HTTP/1.1\r\n\r\n", large, b"more"]


def direct_stream(sock: socket.socket) -> WatchedStream:
    return WatchedStream(httpcore.SyncBackend().connect_tcp(*sock.getsockname()), direct=True)


def test_reads_and_writes_time_out_in_the_kernel_on_a_blocking_socket():
    listener = socket.create_server(("127.0.0.1", 0))
    stream = direct_stream(listener)
    peer, _ = listener.accept()
    try:
        with pytest.raises(httpcore.ReadTimeout):
            stream.read(1024, timeout=0.05)  # the peer sends nothing
        sock = stream.get_extra_info("socket")
        assert sock.gettimeout() is None  # blocking: no poll before each recv
        with pytest.raises(httpcore.WriteTimeout):
            stream.write(b"x" * 64 * 1024 * 1024, timeout=0.05)  # the peer reads nothing
        peer.sendall(b"late")
        assert stream.read(1024, timeout=None) == b"late"  # None: wait as long as it takes
    finally:
        stream.close()
        peer.close()
        listener.close()


def test_an_upstream_that_never_reads_the_request_times_out_as_such():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    port = listener.getsockname()[1]
    client = Upstream(connect_timeout=5, read_timeout=0.2)
    body = b"x" * 64 * 1024 * 1024
    try:
        with pytest.raises(errors.UpstreamTimeout, match="sending the request to"):
            client.send("POST", f"http://127.0.0.1:{port}/v1", {}, body)
    finally:
        client.close()
        listener.close()


def test_the_upstream_gets_httpx_default_headers_unless_the_request_has_its_own(httpserver):
    seen: list[dict[str, str]] = []

    def record(request: Request) -> Response:
        seen.append({name.lower(): value for name, value in request.headers.items()})
        return Response("{}", content_type="application/json")

    httpserver.expect_request("/v1/x").respond_with_handler(record)
    client = Upstream(connect_timeout=5, read_timeout=5)
    url = httpserver.url_for("/v1/x")
    try:
        for headers in ({}, {"User-Agent": "mine/1", "accept-encoding": "identity"}):
            client.send("POST", url, headers, b"{}").close()
    finally:
        client.close()
    expected = httpx.Client().headers
    assert seen[0]["user-agent"] == expected["user-agent"]
    assert seen[0]["accept-encoding"] == expected["accept-encoding"]
    assert seen[0]["accept"] == "*/*"
    assert (seen[1]["user-agent"], seen[1]["accept-encoding"]) == ("mine/1", "identity")
    assert seen[1]["accept"] == "*/*"


def test_only_urls_from_the_config_alone_are_kept_parsed():
    """A client's path segments vary without bound, and a query may carry an API key
    (Gemini's ``?key=``): neither lingers in a cache."""
    cache = upstream._parsed_configured_url
    before = cache.cache_info().currsize
    assert upstream.parsed_url("http://h/v1/x?key=secret").params["key"] == "secret"
    assert upstream.parsed_url("http://h/v1/files/abc") == httpx.URL("http://h/v1/files/abc")
    assert cache.cache_info().currsize == before
    kept = upstream.parsed_url("http://h/v1/chat/completions", configured=True)
    assert upstream.parsed_url("http://h/v1/chat/completions", configured=True) is kept


def test_the_router_keeps_parsed_only_the_urls_of_its_config(router, httpserver):
    httpserver.expect_request("/v1/chat/completions").respond_with_json({})
    httpserver.expect_request("/v1/files/file-client-1").respond_with_json({})
    httpserver.expect_request("/v1/models").respond_with_json({"data": []})
    cache = upstream._parsed_configured_url
    cache.cache_clear()
    headers = {"Authorization": "Bearer k"}
    for _ in range(2):
        httpx.post(router.url + "/v1/chat/completions", json={"model": "m"}, headers=headers)
        httpx.get(router.url + "/v1/files/file-client-1", headers=headers)
        httpx.get(router.url + "/v1/models?key=client-secret", headers=headers)
    assert len(httpserver.log) == 6
    assert (cache.cache_info().currsize, cache.cache_info().hits) == (1, 1)  # chat only
    cache(httpserver.url_for("/v1/chat/completions"))
    assert cache.cache_info().hits == 2  # and that one entry is the chat URL
