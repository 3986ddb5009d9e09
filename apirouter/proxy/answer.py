"""Turn the upstream's answer into the client's: read whole when small, else relayed as it
arrives (SSE with heartbeats, other bodies as bytes), with usage read on the side.

Every answer ends in one ``Reporter.finish``: a whole answer's when the app returns it, a
relayed one's when the server closes the relay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import httpx

from apirouter import errors
from apirouter.config.headers import relayed_response_headers
from apirouter.config.provider import Endpoint
from apirouter.observe.context import Outcome, RequestContext
from apirouter.observe.report import Reporter
from apirouter.observe.usage import USAGE_ROUTES, UsageReader
from apirouter.proxy.relay import Relay
from apirouter.proxy.response import Response
from apirouter.upstream.client import CLIENT_LEFT, iter_raw
from apirouter.upstream.hangup import Hangup

SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]  # no proxy buffering
WHOLE_ANSWER_BYTES = 64 * 1024  # answers of known length up to this are read whole


class Answers:
    """Builds the client's response from an upstream response (the reporter finishes it)."""

    def __init__(self, reporter: Reporter, clock: Callable[[], float]) -> None:
        self.reporter = reporter
        self.clock = clock

    def respond(
        self,
        ctx: RequestContext,
        endpoint: Endpoint,
        upstream_response: httpx.Response,
        gone: Hangup | None = None,
    ) -> Response:
        """Relay the upstream's answer: a small answer of known length is read whole (one
        write, and its outcome recorded before it goes out); SSE is relayed as it arrives
        with heartbeats, and any other answer as bytes, keeping the upstream's
        Content-Length when it sent one, so memory stays bounded whatever the size."""
        status = upstream_response.status_code
        error = None
        if status >= 500:
            error = errors.UpstreamServerError(
                f"The upstream {ctx.upstream_host} answered HTTP {status}.", status
            )
        relayed = relayed_response_headers(upstream_response.headers.raw)
        content_type = upstream_response.headers.get("content-type", "")
        sse = content_type.startswith("text/event-stream")
        if sse:
            ours = {name.lower() for name, _ in SSE_HEADERS}  # replace, never duplicate
            relayed = [h for h in relayed if h[0].lower() not in ours] + SSE_HEADERS
        elif _small(upstream_response.headers.get("content-length")):
            return self._whole(ctx, endpoint, upstream_response, status, relayed, error, gone)
        elif "content-length" in upstream_response.headers:
            relayed.append(("Content-Length", upstream_response.headers["content-length"]))
        timing = _Timing(self.clock, ctx)
        usage = _usage_reader(endpoint, content_type, upstream_response)
        relay = Relay(
            upstream_response,
            on_close=functools.partial(self._finish_relay, ctx, status, error, timing, usage, sse),
            heartbeat_seconds=endpoint.stream_config.heartbeat_interval_secs if sse else None,
            observer=usage,
            on_first_byte=timing.first_byte,
            gone=gone,
        )
        return Response(status, relayed, error=error, relay=relay)

    def _whole(
        self,
        ctx: RequestContext,
        endpoint: Endpoint,
        upstream_response: httpx.Response,
        status: int,
        relayed: list[tuple[str, str]],
        error: errors.RouterError | None,
        gone: Hangup | None,
    ) -> Response:
        timing = _Timing(self.clock, ctx)
        usage = _usage_reader(
            endpoint, upstream_response.headers.get("content-type", ""), upstream_response
        )
        chunks: list[bytes] = []
        try:
            for chunk in iter_raw(upstream_response):
                if not chunks:
                    timing.first_byte()
                chunks.append(chunk)
        except errors.UpstreamFailure:
            if gone is not None and gone.reason is not None:  # we shut it: the client left
                raise errors.client_gone(gone.reason, CLIENT_LEFT) from None
            raise
        finally:
            upstream_response.close()
        data = b"".join(chunks)
        if usage is not None:
            usage.feed(data)
            ctx.usage = usage.result()
        relayed.append(("Content-Length", str(len(data))))
        return Response(status, relayed, data, error)

    def _finish_relay(
        self,
        ctx: RequestContext,
        status: int,
        error: errors.RouterError | None,
        timing: _Timing,
        usage: UsageReader | None,
        sse: bool,
        relay_error: errors.RouterError | None,
    ) -> None:
        timing.finished(sse)
        if usage is not None:
            ctx.usage = usage.result()
        self.reporter.finish(ctx, Outcome(status, relay_error or error))


def _small(content_length: str | None) -> bool:
    return (
        content_length is not None
        and content_length.isdigit()
        and (int(content_length) <= WHOLE_ANSWER_BYTES)
    )


class _Timing:
    """Time to first byte (from sending the request) and, for streams, the stream's length."""

    def __init__(self, clock: Callable[[], float], ctx: RequestContext) -> None:
        self._clock = clock
        self._ctx = ctx
        self._headers_at = clock()  # the headers have just arrived
        self._first_at: float | None = None

    def first_byte(self) -> None:
        self._first_at = self._clock()
        self._ctx.first_byte_seconds = (self._ctx.upstream_seconds or 0.0) + (
            self._first_at - self._headers_at
        )

    def finished(self, sse: bool) -> None:
        if sse and self._first_at is not None:
            self._ctx.stream_seconds = self._clock() - self._first_at


def _usage_reader(
    endpoint: Endpoint, content_type: str, response: httpx.Response
) -> UsageReader | None:
    """A usage reader where the answer may carry token usage (JSON or SSE, usage routes)."""
    if endpoint.local_path not in USAGE_ROUTES:
        return None
    if not (content_type.startswith("text/event-stream") or "json" in content_type):
        return None
    return UsageReader(content_type, response.headers.get("content-encoding"))
