"""The lean chunked body reader: framing decoded right, h11 handed over and back exactly,
and the upstream connection reused afterwards as if httpx had read the body.

The handover is tested against a real h11 connection fed scripted pieces, split at every
byte, so each state h11 can be left in (mid chunk-size line, mid data, mid CRLF) is met
deterministically; the pool is tested over loopback against a raw upstream.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import h11
import pytest
import trustme
from upstream_fakes import RawUpstream

from apirouter import errors
from apirouter.upstream import chunked
from apirouter.upstream.client import Upstream, iter_raw, watch_idle

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"i": %d}\n\n' % i for i in range(4)] + [b"data: [DONE]\n\n"]


def framed(pieces: list[bytes], last: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + last


def reader(pieces: list[bytes]) -> Callable[[], bytes]:
    """A read function handing out ``pieces`` one per call, then b"" (connection closed)."""
    queue = iter(pieces)
    return lambda: next(queue, b"")


def splits(data: bytes) -> Iterator[list[bytes]]:
    """``data`` cut in two at every position, and in single bytes."""
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


def decode_all(pieces: list[bytes]) -> tuple[bytes, bytes]:
    body = chunked.decode(reader(pieces[1:]), pieces[0])
    out = []
    while True:
        try:
            out.append(next(body))
        except StopIteration as end:
            return b"".join(out), end.value


# --- the framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        framed(EVENTS),
        framed([b"x" * 300], last=b"0;ext=1\r\nX-Trailer: t\r\n\r\n"),  # extension, trailer
        b"1A ; name=value\r\n" + b"y" * 26 + b"\r\n0\r\n\r\n",  # upper-case hex, extension
    ],
)
def test_decode_gives_every_byte_however_the_reads_fall(wire):
    expected, _ = decode_all([wire])
    assert expected and b"\r\n0" not in expected
    for pieces in splits(wire):
        assert decode_all(pieces) == (expected, b"")


def test_decode_yields_a_large_chunk_in_pieces_as_they_arrive():
    pieces = [b"b" * 500, b"c" * 490 + b"\r\n0\r\n\r\n"]
    body = chunked.decode(reader(pieces), b"3e8\r\n" + b"a" * 10)  # one chunk of 1,000
    assert [len(piece) for piece in body] == [10, 500, 490]


def test_decode_gives_the_chunks_of_one_read_as_one_piece():
    first = framed(EVENTS[:2], last=b"")
    body = chunked.decode(reader([framed(EVENTS[2:])]), first)
    assert list(body) == [EVENTS[0] + EVENTS[1], b"".join(EVENTS[2:])]


def test_decode_never_yields_an_empty_piece():
    assert list(chunked.decode(reader([b"hello\r\n0\r\n\r\n"]), b"5\r\n")) == [b"hello"]


def test_decode_returns_what_follows_the_body():
    assert decode_all([framed(EVENTS) + b"HTTP/1.1 200"]) == (b"".join(EVENTS), b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"0x5\r\nhello\r\n0\r\n\r\n",  # int() would take it; HTTP does not
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",  # data not followed by CRLF
        b"5\r\nhel",  # the connection closed inside a chunk
        b"5" * (chunked.MAX_LINE + 10),  # a size line that never ends
    ],
)
def test_decode_refuses_broken_framing(wire):
    with pytest.raises(chunked.ChunkError):
        decode_all([wire])


# --- the handover with h11 -------------------------------------------------------------------


def h11_after_head(first_bytes: bytes) -> h11.Connection:
    """A client-side h11 connection that has sent a request and received ``first_bytes``
    (the response head, perhaps with the start of the body), as httpcore leaves it."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/", headers=[("Host", "u")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(first_bytes)
    assert isinstance(connection.next_event(), h11.Response)
    return connection


def test_the_body_is_whole_and_h11_done_wherever_the_reads_fall():
    body = framed(EVENTS)
    for pieces in splits(HEAD + body):
        if len(pieces[0]) < len(HEAD):  # the head must be read by h11 itself first
            continue
        connection = h11_after_head(pieces[0])
        out = b"".join(chunked._body(connection, reader(pieces[1:])))
        assert out == b"".join(EVENTS), pieces
        assert connection.their_state is h11.DONE  # the connection can be reused


def test_a_cut_body_raises_and_leaves_h11_mid_body_so_the_connection_is_closed():
    connection = h11_after_head(HEAD)
    wire = framed(EVENTS)[:-9]
    with pytest.raises(chunked.ChunkError):
        b"".join(chunked._body(connection, reader([wire])))
    assert connection.their_state is h11.SEND_BODY


# --- over loopback, through httpx's pool -----------------------------------------------------


def relay(upstream: Upstream, url: str) -> tuple[bytes, bool]:
    response = upstream.send("POST", url, {"content-type": "application/json"}, b"{}")
    lean = chunked._h11_connection(response) is not None
    watch_idle(response, 5.0, lambda: None)
    try:
        return b"".join(iter_raw(response)), lean
    finally:
        watch_idle(response, 0.0, None)
        response.close()


def assert_relayed_lean_on_one_connection(
    raw: RawUpstream, upstream: Upstream, events: list[bytes], times: int
) -> None:
    try:
        for _ in range(times):
            body, lean = relay(upstream, raw.url)
            assert lean
            assert body == b"".join(events)
        assert raw.connections == 1
    finally:
        upstream.close()
        raw.close()


def test_streams_are_read_lean_and_the_connection_is_reused():
    """If a new httpx or httpcore moves the attributes that lead to h11, this fails (the
    router would still work, through httpx, at three times the CPU per event)."""
    raw = RawUpstream(HEAD + framed(EVENTS))
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    assert_relayed_lean_on_one_connection(raw, upstream, EVENTS, times=3)


def test_a_broken_chunked_body_is_an_upstream_protocol_error_and_not_reused():
    raw = RawUpstream(HEAD + framed(EVENTS[:1], last=b"zz\r\n"))
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    try:
        with pytest.raises(errors.UpstreamProtocolError, match="broken or incomplete"):
            relay(upstream, raw.url)
        raw.answer = HEAD + framed(EVENTS)
        assert relay(upstream, raw.url)[0] == b"".join(EVENTS)
        assert raw.connections == 2  # the broken connection was closed, not reused
    finally:
        upstream.close()
        raw.close()


def test_a_stream_over_tls_is_read_lean_and_its_connection_reused(monkeypatch):
    """The providers' real case: TLS. The lean reader reads the TLS socket, and an event
    split across TLS records still comes out whole."""
    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    events = [b"data: " + b"x" * 40_000 + b"\n\n", *EVENTS]  # larger than a TLS record
    raw = RawUpstream(HEAD + framed(events), tls=server)
    with authority.cert_pem.tempfile() as ca_file:
        monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # httpx's trust store for this client
        upstream = Upstream(connect_timeout=5, read_timeout=5)
    assert_relayed_lean_on_one_connection(raw, upstream, events, times=2)


def test_a_body_of_known_length_is_read_through_h11_and_the_connection_reused():
    body = b'{"id": "c", "usage": {"prompt_tokens": 1}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    raw = RawUpstream(head % len(body) + body)
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    try:
        for _ in range(3):
            response = upstream.send("POST", raw.url, {}, b"{}")
            assert chunked.lean_body(response, lambda: b"") is not None  # not through httpx
            assert b"".join(iter_raw(response)) == body
            response.close()
        assert raw.connections == 1
    finally:
        upstream.close()
        raw.close()


def test_a_body_shorter_than_its_length_is_an_upstream_protocol_error():
    raw = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", hang_up=True)
    upstream = Upstream(connect_timeout=5, read_timeout=5)
    try:
        response = upstream.send("POST", raw.url, {}, b"{}")
        with pytest.raises(errors.UpstreamProtocolError, match="broken or incomplete"):
            b"".join(iter_raw(response))
        response.close()
    finally:
        upstream.close()
        raw.close()
