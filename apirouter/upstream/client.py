"""The one shared upstream HTTP client, and the one place httpx failures become ours.

Hazards handled here (see DESIGN.md §7): httpx's 5 s default timeout is far too short for
LLM calls, so every timeout is explicit; a shared client's cookie jar would carry one
user's cookies into the next user's request, so it has no jar (``CookielessClient``); bodies are
relayed raw (``iter_raw``) so compressed upstream bytes reach the client as sent; and
httpx's INFO log of every full URL is silenced.

Pool size: the connection pool has no cap of its own. The capacity gate
(``apirouter.proxy.capacity``) already bounds proxied requests in flight, and each holds at most
one upstream connection, so a second, smaller cap could only turn request N+1 into a
``PoolTimeout`` reported as an upstream failure: a false alert about a healthy provider.
The pool is ``apirouter.upstream.pool.LeanPool``: httpcore's own does quadratic bookkeeping at a
thousand connections.

Idle watch: a stream's heartbeats come from the thread that reads it. Sockets are opened
through ``WatchedBackend``, whose streams can be told (``watch_idle``) to call back every
``interval`` seconds of upstream silence while the read goes on, so no second thread per
stream is needed to notice silence.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from apirouter import errors
from apirouter.upstream import chunked, hangup
from apirouter.upstream.httpcore_internals import pool_ssl_context
from apirouter.upstream.httpx_internals import replace_transport_pool, transport_pool
from apirouter.upstream.pool import LeanPool

logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)
READ_BYTES = 64 * 1024  # per read of a body relayed as it arrives (httpcore's own size)
_UNSET = -1.0  # a socket timeout not yet set by us
HEAD_HELD_BYTES = 64 * 1024  # a request head, and a body piece it is sent with, below this
CLIENT_LEFT = "The client closed the connection while the upstream was answering."


class Upstream:
    """A pooled, keep-alive httpx client shared by every request thread."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        transport: httpx.BaseTransport | None = None,
        keepalive_connections: int = 256,
    ) -> None:
        self.client = CookielessClient(
            timeout=httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
            ),
            follow_redirects=False,
            transport=transport or WatchedTransport(keepalive_connections),
        )
        self._default_headers = list(self.client.headers.raw)

    def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | Iterable[bytes],
        first_byte_timeout: float | None = None,
        configured_url: bool = False,
        gone: hangup.Hangup | None = None,
    ) -> httpx.Response:
        """Send a request and return the response with its body not yet read.

        ``configured_url``: the URL comes from the config alone (no path segment or query
        of the client's), so it is kept parsed for the next request (``parsed_url``).

        ``first_byte_timeout`` bounds the wait for the response headers only: once they
        arrive, the body is read with the ordinary (long) read timeout.

        A body given as pieces is sent as they come (never joined): with a
        ``content-length`` in ``headers`` it goes with that fixed length, else chunked.
        An exception raised by the pieces aborts the request and propagates unchanged.

        ``gone``: the client's hang-up, which may shut the upstream socket from another
        thread; a failure after it is the client's (``ClientDisconnected``), not the
        upstream's.
        """
        timeout = self.client.timeout
        if first_byte_timeout is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=first_byte_timeout,
                write=timeout.write,
                pool=timeout.pool,
            )
        host = urlsplit(url).hostname or ""
        try:
            request = httpx.Request(
                method,
                parsed_url(url, configured_url),
                headers=self._with_defaults(wire_headers(headers)),
                content=body,
                extensions={"timeout": timeout.as_dict()},
            )
            response = self.client.send(request, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is not an HTTPError
            if gone is not None and gone.reason is not None:
                raise errors.client_gone(gone.reason, CLIENT_LEFT) from exc
            raise translate_httpx_error(exc, host) from exc
        if first_byte_timeout is not None:  # httpcore reads this dict when the body starts
            request.extensions["timeout"]["read"] = self.client.timeout.read
        return response

    def _with_defaults(self, wire: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """The client's default headers (User-Agent, Accept, ...) unless ``wire`` has its
        own, then ``wire``: what ``client.build_request`` would merge, at a third of the
        cost (it also parses the URL twice and copies the headers twice)."""
        names = {name.lower() for name in wire}
        defaults = [(n, v) for n, v in self._default_headers if n.lower() not in names]
        return defaults + list(wire.items())

    def close(self) -> None:
        self.client.close()


class _NoCookies(httpx.Cookies):
    """Always empty: an upstream's cookies are never parsed, kept or sent."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def __bool__(self) -> bool:
        return False


class CookielessClient(httpx.Client):
    """httpx's client with no cookie jar at all.

    A shared client's jar would carry one user's cookies into the next user's request.
    Refusing them through a cookie policy still parsed every response's headers into
    urllib's cookie machinery: about 50 µs of CPU a request, for nothing.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._no_cookies = _NoCookies()  # one empty jar, made once
        super().__init__(**kwargs)

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass


@functools.lru_cache(maxsize=512)
def _parsed_configured_url(url: str) -> httpx.URL:
    return httpx.URL(url)


def parsed_url(url: str, configured: bool = False) -> httpx.URL:
    """``url`` parsed; from a cache when it comes from the config alone, where a few URLs
    carry nearly every request and parsing one costs about 10 µs. Never a URL with a
    client's path segment or query: those vary without bound, and a query may hold a key
    (Gemini's ``?key=``), which must not linger in a cache."""
    return _parsed_configured_url(url) if configured else httpx.URL(url)


def wire_headers(headers: dict[str, str]) -> dict[bytes, bytes]:
    """Header values as the bytes to send, never re-encoded.

    WSGI hands us the client's header bytes decoded as latin-1 (PEP 3333), so encoding
    them as latin-1 restores exactly what the client sent (httpx would otherwise insist
    on ASCII and fail on ``X-Title: café``). A configured value beyond latin-1 goes as
    UTF-8.
    """
    wire = {}
    for name, value in headers.items():
        try:
            wire[name.encode("latin-1")] = value.encode("latin-1")
        except UnicodeEncodeError:
            wire[name.encode("latin-1")] = value.encode("utf-8")
    return wire


def iter_raw(response: httpx.Response) -> Iterator[bytes]:
    """The response body as the upstream sent it (no decompression), translating failures.

    No chunk size: httpx would then hold bytes back until a chunk is full, delaying SSE
    events. Each piece is yielded the moment it arrives. A chunked body, or one of known
    length, on a socket we opened is read straight off it (``apirouter.upstream.chunked``: a sixth
    of the CPU per piece).
    """
    host = response.request.url.host
    stream = response.extensions.get("network_stream")
    body = None
    if isinstance(stream, WatchedStream) and stream.direct:
        timeout = response.request.extensions.get("timeout", {}).get("read")
        body = chunked.lean_body(response, functools.partial(stream.read, READ_BYTES, timeout))
    if body is None:
        try:
            yield from response.iter_raw()
        except httpx.HTTPError as exc:
            raise translate_httpx_error(exc, host) from exc
        return
    try:
        yield from body
    except chunked.ChunkError as exc:
        raise errors.UpstreamProtocolError(
            f"The upstream {host} sent a broken or incomplete response: {exc}"
        ) from exc
    except httpcore.ReadTimeout as exc:
        raise translate_httpx_error(httpx.ReadTimeout(str(exc)), host) from exc
    except httpcore.ReadError as exc:
        raise translate_httpx_error(httpx.ReadError(str(exc)), host) from exc


def translate_httpx_error(exc: Exception, host: str) -> errors.RouterError:
    """Map an httpx exception to the taxonomy. The only place that knows httpx's errors."""
    if isinstance(exc, httpx.PoolTimeout):  # our own limit, never the provider's fault
        return errors.OverCapacity(f"No free connection to the upstream {host}; retry shortly.")
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting to",
            httpx.ReadTimeout: "waiting for a response from",
            httpx.WriteTimeout: "sending the request to",
        }.get(type(exc), "talking to")
        return errors.UpstreamTimeout(f"Timed out {phase} the upstream {host}.")
    if isinstance(exc, httpx.ConnectError):
        cause = _root_cause(exc)
        if isinstance(cause, socket.gaierror):
            return errors.UpstreamDNSError(f"The upstream host name {host} could not be resolved.")
        if isinstance(cause, ssl.SSLError) or "SSL" in str(exc):
            return errors.UpstreamTLSError(f"TLS handshake with the upstream {host} failed: {exc}")
        return errors.UpstreamConnectError(f"Could not connect to the upstream {host}: {exc}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return errors.ConfigError(f"The configured upstream URL cannot be used: {exc}")
    return errors.UpstreamProtocolError(
        f"The upstream {host} sent a broken or incomplete response: {type(exc).__name__}"
    )


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while True:
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            return seen
        seen = nxt


# --- idle watch: heartbeats without a reader thread ------------------------------------------


class WatchedStream(httpcore.NetworkStream):
    """A socket stream whose blocking reads can call back during upstream silence.

    httpcore reads from the socket only when its parser needs more bytes, i.e. when every
    event received so far has been handed up; so silence seen here is real silence. A
    callback that raises aborts the read (httpcore then closes the connection).

    Reads and writes go straight to sockets we opened ourselves (``direct``; TLS inside TLS
    goes through an SSL object, not the socket), with their timeouts set only when they
    change: httpcore sets a socket's timeout before every read and write, one system call
    each. A plain TCP socket is used in blocking mode with its timeouts kept by the kernel
    (``SO_RCVTIMEO``, ``SO_SNDTIMEO``): Python's own timeout polls the socket before every
    ``recv`` and ``send``, another system call each. A relayed SSE event costs one ``recv``.

    A request's head is held back until its body's first write (or the first read), so
    head and body leave in one send: httpcore writes them apart, which costs a system call
    and gives the upstream two packets to wake up for. A streamed body's later pieces, and
    anything large, go as they come. h11 always writes after the head (b"" ends a body of
    known length), so the head goes out from ``write``, where httpcore expects write errors.

    A kernel timeout restarts when a signal interrupts the call (Python retries it), where
    Python's own would keep its deadline; process signals go to the main thread, which does
    no upstream I/O.
    """

    def __init__(self, inner: httpcore.NetworkStream, direct: bool, tls: bool = False) -> None:
        self._inner = inner
        self.direct = direct
        self._tls = tls
        self.idle: tuple[float, Callable[[], None]] | None = None
        self._sock = inner.get_extra_info("socket") if direct else None
        self._kernel_timeouts: dict[int, float | None] = {}  # SO_RCVTIMEO, SO_SNDTIMEO as set
        self._next_write_is_head = True  # at the start, and after every read
        self._head: bytes | None = None  # a request head held back for its body
        self._head_timeout: float | None = None
        self.owner: hangup.Hangup | None = None  # the request that sent on it last

    def raw_socket(self) -> Any:
        """The socket under this stream (TLS or not), for a hang-up to shut down."""
        return self._inner.get_extra_info("socket")

    def watch(self, idle: tuple[float, Callable[[], None]] | None) -> None:
        self.idle = idle

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._next_write_is_head = True
        if self._head is not None:
            self._send_head()
        if self.idle is None:
            return self._read_once(max_bytes, timeout)
        interval, on_idle = self.idle
        step = interval if timeout is None else min(interval, timeout)
        silent = 0.0
        while True:
            try:
                return self._read_once(max_bytes, step)
            except httpcore.ReadTimeout:
                silent += step
                if timeout is not None and silent >= timeout:
                    raise
                on_idle()

    def _read_once(self, max_bytes: int, timeout: float | None) -> bytes:
        sock = self._sock
        if sock is None:
            return self._inner.read(max_bytes, timeout)
        try:
            self._time_out(sock, socket.SO_RCVTIMEO, timeout)
            data: bytes = sock.recv(max_bytes)
            return data
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO ran out
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._next_write_is_head:
            self._next_write_is_head = False
            hangup.claim(self)  # a new request: the one being sent on this thread
            if len(buffer) < HEAD_HELD_BYTES:
                self._head, self._head_timeout = buffer, timeout
                return
        if self._head is not None:
            if len(buffer) < HEAD_HELD_BYTES:
                buffer, self._head = self._head + buffer, None
            else:
                self._send_head()
        self._write_now(buffer, timeout)

    def _write_now(self, buffer: bytes, timeout: float | None) -> None:
        if not buffer:
            return
        sock = self._sock
        if sock is None:
            self._inner.write(buffer, timeout)
            return
        try:
            self._time_out(sock, socket.SO_SNDTIMEO, timeout)
            sock.sendall(buffer)
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_SNDTIMEO ran out
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def _time_out(self, sock: socket.socket, option: int, timeout: float | None) -> None:
        """Give ``sock`` ``timeout`` for the next read (SO_RCVTIMEO) or write (SO_SNDTIMEO),
        with a system call only when it changes: TLS through Python's socket timeout, plain
        TCP in blocking mode with the kernel's."""
        if self._tls:
            if sock.gettimeout() != timeout:
                sock.settimeout(timeout)
            return
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        if self._kernel_timeouts.get(option, _UNSET) != timeout:
            sock.setsockopt(socket.SOL_SOCKET, option, _timeval(timeout))
            self._kernel_timeouts[option] = timeout

    def _send_head(self) -> None:
        head, self._head = self._head, None
        if head:
            self._write_now(head, self._head_timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return WatchedStream(inner, direct=self.direct and not self._tls, tls=True)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class WatchedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, with every stream wrapped in a ``WatchedStream``."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return WatchedStream(inner, direct=True)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.connect_unix_socket(path, timeout, socket_options)
        return WatchedStream(inner, direct=True)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class WatchedTransport(httpx.HTTPTransport):
    """httpx's transport over a ``WatchedBackend`` pool with no connection cap of its own.

    httpx offers no public way to choose the network backend, so the pool it built is
    replaced by an equivalent one (same TLS context) that uses ours.
    """

    def __init__(self, keepalive_connections: int) -> None:
        super().__init__()
        pool = LeanPool(
            ssl_context=pool_ssl_context(transport_pool(self)),
            max_connections=None,
            max_keepalive_connections=keepalive_connections,
            keepalive_expiry=httpx.Limits(max_connections=None).keepalive_expiry,
            network_backend=WatchedBackend(),
        )
        replace_transport_pool(self, pool)


def watch_idle(
    response: httpx.Response, interval: float, on_idle: Callable[[], None] | None
) -> bool:
    """Call ``on_idle`` every ``interval`` s of upstream silence while ``response`` is read.

    Pass ``None`` to stop watching (before the connection goes back to the pool). Returns
    False when the response did not come through a ``WatchedTransport`` (a test transport,
    or a proxy from the environment): then there is nothing to watch.
    """
    stream = response.extensions.get("network_stream")
    if not isinstance(stream, WatchedStream):
        return False
    stream.watch(None if on_idle is None else (interval, on_idle))
    return True


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO; None: no timeout. Zero means no
    timeout to the kernel, so a positive timeout is never rounded down to it."""
    seconds = seconds or 0.0
    if seconds > 0:
        seconds = max(seconds, 0.001)
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
