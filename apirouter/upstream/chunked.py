"""Read an upstream response body straight off the socket, for the relay.

Why: taking each piece of a streamed body through httpx, httpcore and h11 costs about
15 µs of CPU (five generator layers, a context manager and an h11 event per piece), as
much as everything else the router does to relay an SSE event. Decoding the chunk framing
here costs about 1 µs on top of the ``recv`` itself.

How it stays within httpx's connection pool: httpx sends the request and parses the
status line and headers as usual, and h11 keeps the connection's state. The body's first
bytes may already sit in h11's buffer, so they are taken through h11 (its public API:
``next_event``, ``Data.chunk_end``, ``trailing_data``) until h11 stands at a chunk
boundary with nothing buffered. From then on the socket is read directly and the framing
decoded here. At the end h11 is handed the terminating zero-size chunk, so it reaches
DONE too and closing the response gives the connection back to the pool as if httpx had
read the body. A failure part-way leaves h11 mid-body, so httpcore closes that connection
rather than reuse it.

A body of known length (``Content-Length``) is read through h11 alone, with the same
``read``: it needs no framing of ours, and skipping httpx's and httpcore's layers saves
about 25 µs on every non-streamed answer.

Only HTTP/1.1 bodies read from a plain or TLS socket we opened, chunked or of known length,
take this path (``lean_body`` says None otherwise: a body that ends when the connection
closes is left to httpx); reaching h11 takes a few private attributes of httpx and
httpcore, checked at every step, and a test fails if a new version moves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator

import h11
import httpx

from apirouter.upstream.httpcore_internals import h11_connection
from apirouter.upstream.httpx_internals import httpcore_stream

MAX_LINE = 16 * 1024  # a chunk-size or trailer line (h11's default limit)
MAX_TRAILERS = 64 * 1024
_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF_PREFIXES = (b"", b"\r", b"\r\n")

Read = Callable[[], bytes]


class ChunkError(Exception):
    """The upstream broke the body's framing, or closed the connection inside the body."""


def lean_body(response: httpx.Response, read: Read) -> Iterator[bytes] | None:
    """The body's pieces read with ``read`` (the upstream socket), or None when this
    response cannot be read that way and httpx must read it."""
    connection = _h11_connection(response)
    if connection is None:
        return None
    headers = response.headers
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    if not chunked and "content-length" not in headers:  # ends when the connection closes
        return None
    if connection.their_http_version != b"1.1" or connection.their_state is not h11.SEND_BODY:
        return None
    return _body(connection, read)


def _h11_connection(response: httpx.Response) -> h11.Connection | None:
    """The h11 state machine of the connection ``response`` arrived on, if it is reachable:
    httpx's response stream → httpcore's pool stream → the HTTP/1.1 connection."""
    return h11_connection(httpcore_stream(response))


def _body(connection: h11.Connection, read: Read) -> Iterator[bytes]:
    while True:  # first through h11, until it has just ended a chunk with nothing after it
        # (a body of known length: to its end)
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise ChunkError(str(exc)) from exc
        if event is h11.NEED_DATA:
            connection.receive_data(_more(read))
        elif isinstance(event, h11.Data):
            yield bytes(event.data)
            if event.chunk_end:
                held = connection.trailing_data[0]
                if held in _CRLF_PREFIXES:
                    break
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ChunkError(f"unexpected {type(event).__name__} in the body")
    # h11 now expects the CRLF that ends the chunk (it may hold part of it), then a
    # chunk-size line; the rest of the body is decoded here, from that same point.
    leftover = yield from decode(read, held, after_chunk=True)
    if leftover:  # nothing may follow a response: the connection is not reused
        return
    connection.receive_data(b"\r\n"[len(held) :] + _LAST_CHUNK)
    try:
        ended = isinstance(connection.next_event(), h11.EndOfMessage)
    except h11.RemoteProtocolError:
        ended = False
    if not ended:  # never seen: the connection is then closed instead of reused
        raise ChunkError("the connection's state did not follow the body")


def decode(read: Read, buffer: bytes, after_chunk: bool = False) -> Generator[bytes, None, bytes]:
    """Yield the body's data as it arrives and return whatever followed its end.

    The chunks complete in one read come out as one piece (one write to the client, one
    wake-up for it), a chunk split across reads in pieces; nothing is held back across a
    read. ``after_chunk``: ``buffer`` starts with the CRLF that ends a chunk's data."""
    held: list[bytes] = []
    pos = 0
    while True:
        if after_chunk:
            while len(buffer) - pos < 2:
                if held:
                    yield _take(held)
                buffer, pos = buffer[pos:] + _more(read), 0
            if buffer[pos : pos + 2] != b"\r\n":
                raise ChunkError("chunk data not followed by CRLF")
            pos += 2
        after_chunk = True
        end = buffer.find(b"\r\n", pos)
        while end < 0:
            if len(buffer) - pos > MAX_LINE:
                raise ChunkError("chunk-size line too long")
            if held:
                yield _take(held)
            buffer, pos = buffer[pos:] + _more(read), 0
            end = buffer.find(b"\r\n")
        match = _SIZE.fullmatch(buffer, pos, end)
        if match is None:
            raise ChunkError(f"bad chunk-size line {bytes(buffer[pos:end])[:40]!r}")
        size = int(match[1], 16)
        pos = end + 2
        if size == 0:
            if held:
                yield _take(held)
            return _after_trailers(read, buffer, pos)
        while True:
            available = len(buffer) - pos
            if available >= size:
                held.append(buffer[pos : pos + size])
                pos += size
                break
            if available:
                held.append(buffer[pos:] if pos else buffer)
                size -= available
            if held:
                yield _take(held)
            buffer, pos = _more(read), 0


def _take(held: list[bytes]) -> bytes:
    piece = held[0] if len(held) == 1 else b"".join(held)
    held.clear()
    return piece


def _after_trailers(read: Read, buffer: bytes, pos: int) -> bytes:
    """Skip the trailer section (never relayed); return what follows it."""
    start = pos
    while True:
        end = buffer.find(b"\r\n", pos)
        while end < 0:
            if len(buffer) - start > MAX_TRAILERS:
                raise ChunkError("trailer section too long")
            buffer = buffer + _more(read)
            end = buffer.find(b"\r\n", pos)
        line_empty = end == pos
        pos = end + 2
        if line_empty:
            return buffer[pos:]


def _more(read: Read) -> bytes:
    data = read()
    if not data:
        raise ChunkError("the upstream closed the connection inside the body")
    return data
