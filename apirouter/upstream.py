"""The one shared upstream HTTP client, and the one place httpx failures become ours.

Hazards handled here (see DESIGN.md §7): httpx's 5 s default timeout is far too short for
LLM calls, so every timeout is explicit; a shared client's cookie jar would carry one
user's cookies into the next user's request, so the jar refuses every cookie; bodies are
relayed raw (``iter_raw``) so compressed upstream bytes reach the client as sent; and
httpx's INFO log of every full URL is silenced.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from apirouter import errors

logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


class Upstream:
    """A pooled, keep-alive httpx client shared by every request thread."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.client = httpx.Client(
            timeout=httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
            ),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            follow_redirects=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            transport=transport,
        )

    def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        first_byte_timeout: float | None = None,
    ) -> httpx.Response:
        """Send a request and return the response with its body not yet read.

        ``first_byte_timeout`` bounds the wait for the response headers only: once they
        arrive, the body is read with the ordinary (long) read timeout.
        """
        host = httpx.URL(url).host
        timeout = self.client.timeout
        if first_byte_timeout is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=first_byte_timeout,
                write=timeout.write,
                pool=timeout.pool,
            )
        try:
            request = self.client.build_request(
                method, url, headers=wire_headers(headers), content=body, timeout=timeout
            )
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_httpx_error(exc, host) from exc
        if first_byte_timeout is not None:  # httpcore reads this dict when the body starts
            request.extensions["timeout"]["read"] = self.client.timeout.read
        return response

    def close(self) -> None:
        self.client.close()


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
    events. Each piece is yielded the moment it arrives.
    """
    try:
        yield from response.iter_raw()
    except httpx.HTTPError as exc:
        raise translate_httpx_error(exc, response.request.url.host) from exc


def translate_httpx_error(exc: Exception, host: str) -> errors.RouterError:
    """Map an httpx exception to the taxonomy. The only place that knows httpx's errors."""
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting to",
            httpx.ReadTimeout: "waiting for a response from",
            httpx.WriteTimeout: "sending the request to",
            httpx.PoolTimeout: "waiting for a free connection to",
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
