"""Relay an upstream body to the client as it arrives: SSE with heartbeats, or plain bytes.

The worker thread that serves the request reads the upstream itself: each chunk is yielded
the moment it arrives (no buffering, no re-framing, no hand-off to another thread, so one
thread wake-up per chunk), and memory stays bounded whatever the body's size. Whatever is
read on the side (time to first byte, token usage) is taken *after* the chunk has been
passed on, so it never holds a byte back.

SSE only: silence is noticed by the same blocking read: the upstream socket's idle watch
(``upstream.watch_idle``) calls back every ``heartbeat`` seconds without bytes, and the
relay then writes an SSE comment through the server's ``write`` callable so proxies and
clients keep the connection open. It does so only at an event boundary, so a heartbeat can
never split an event; a failed heartbeat write means the client is gone.

A body the upstream cuts mid-way is an upstream failure (``upstream_stream_cut``; one that
goes silent past the read timeout is ``upstream_timeout``), and the client must be able to
tell: like nginx, we end the response *without* its terminating
chunk (or short of its Content-Length) by letting ``StreamCut`` escape the iterator, so
the server drops the connection instead of finishing the response cleanly.

When the client goes away the server stops iterating and calls ``close``, which closes the
upstream response: we stop reading upstream at once. ``on_close`` is called exactly once,
with the outcome, and the request's capacity slot (if any) is given back just before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import httpx

from apirouter.errors import (
    InternalError,
    RouterError,
    UpstreamFailure,
    UpstreamStreamCut,
    UpstreamTimeout,
    client_gone,
)
from apirouter.upstream.client import iter_raw, watch_idle
from apirouter.upstream.hangup import Hangup

HEARTBEAT = b": heartbeat\n\n"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class Releasable(Protocol):
    def mark_stream(self) -> None: ...
    def release(self) -> None: ...


class Observer(Protocol):
    """Reads relayed bytes on the side (token usage); never raises, never blocks."""

    def feed(self, chunk: bytes) -> None: ...


class StreamCut(Exception):
    """Raised out of the iterator so the server drops the connection: the client sees an
    incomplete response instead of a clean end."""


class _ClientGone(Exception):
    """A heartbeat could not be written: the client left during upstream silence."""


class _QuietStreamCut(logging.Filter):
    """The server logs an exception escaping the app with a traceback; a cut stream is
    reported once, by ``finish``, so the server's echo is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamCut)


logging.getLogger("waitress").addFilter(_QuietStreamCut())


class Relay:
    def __init__(
        self,
        response: httpx.Response,
        on_close: Callable[[RouterError | None], None],
        *,
        heartbeat_seconds: float | None = None,
        observer: Observer | None = None,
        on_first_byte: Callable[[], None] = lambda: None,
        gone: Hangup | None = None,
    ) -> None:
        self._response = response
        self._heartbeat = heartbeat_seconds  # None: not SSE, no heartbeats
        self._on_close = on_close
        self._observer = observer
        self._on_first_byte = on_first_byte
        self._gone = gone  # the server's word on why the client left, when it saw it
        self._write: Callable[[bytes], Any] | None = None
        self._slot: Releasable | None = None
        self._last = b"\n\n"  # ends like the bytes relayed; nothing sent yet is a boundary
        self._done = False
        self._closed = False
        self._error: RouterError | None = None

    @property
    def sse(self) -> bool:
        return self._heartbeat is not None

    def relay_to(self, write: Callable[[bytes], Any]) -> Relay:
        """Give the relay the server's ``write`` (from start_response), for heartbeats."""
        self._write = write
        return self

    def hold(self, slot: Releasable) -> None:
        """Keep the request's capacity slot until the body has been relayed."""
        if self.sse:
            slot.mark_stream()
        self._slot = slot

    def __iter__(self) -> Iterator[bytes]:
        watching = self._watch()
        started = False
        try:
            for chunk in iter_raw(self._response):
                if not started:
                    started = True
                    self._on_first_byte()
                self._last = chunk if len(chunk) > 3 else self._last[-4:] + chunk
                yield chunk
                if self._observer is not None:
                    self._observer.feed(chunk)
            self._done = True
        except _ClientGone:
            return
        except UpstreamFailure as failure:
            if self._client_left():  # the server shut the upstream: the client is gone
                return
            self._error, self._done = _cut(failure), True
            if not started:
                yield b""  # the status line and headers go out first: then the cut shows
            raise StreamCut from failure
        except RouterError as error:
            self._error, self._done = error, True
        except Exception as exc:
            if self._closed:  # the response was closed under us: nobody is listening
                return
            self._error = InternalError(f"The relay failed: {type(exc).__name__}")
            self._error.__cause__ = exc
            self._done = True
        finally:
            if watching:
                watch_idle(self._response, 0.0, None)

    def _watch(self) -> bool:
        if self._heartbeat is None or self._write is None:
            return False
        return watch_idle(self._response, self._heartbeat, self._idle)

    def _idle(self) -> None:
        """Upstream silence for a heartbeat interval: keep the client's connection alive."""
        if not self._last.endswith(_BOUNDARIES) or self._write is None:
            return
        try:
            self._write(HEARTBEAT)
        except Exception as exc:  # waitress ClientDisconnected, gunicorn OSError, ...
            raise _ClientGone from exc

    def close(self) -> None:
        """Called by the server once, after the last write or when the client left."""
        if self._closed:
            return
        self._closed = True
        try:
            watch_idle(self._response, 0.0, None)
            self._response.close()
        finally:  # whatever closing the upstream did, the slot and the outcome are given back
            if self._slot is not None:
                self._slot.release()
            error = self._error
            if error is None and not self._done:
                reason = self._gone.reason if self._gone is not None else None
                error = client_gone(reason, "The client closed the connection during the response.")
            self._on_close(error)

    def _client_left(self) -> bool:
        return self._gone is not None and self._gone.reason is not None


def _cut(failure: UpstreamFailure) -> UpstreamFailure:
    """What ended the body mid-way: silence past the read timeout stays a timeout (the
    upstream is slow or hung, not cutting), anything else is a cut."""
    if isinstance(failure, UpstreamTimeout):
        timeout = UpstreamTimeout(f"The upstream went silent mid-way: {failure.message}")
        timeout.__cause__ = failure
        return timeout
    cut = UpstreamStreamCut(f"The upstream cut the response mid-way: {failure.message}")
    cut.__cause__ = failure
    return cut
