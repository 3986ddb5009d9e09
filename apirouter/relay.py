"""Relay an upstream SSE stream to the client as it arrives, with heartbeats.

The worker thread that serves the request reads the upstream itself: each chunk is yielded
the moment it arrives (no buffering, no re-framing, no hand-off to another thread, so one
thread wake-up per event). Silence is noticed by the same blocking read: the upstream
socket's idle watch (``upstream.watch_idle``) calls back every ``heartbeat`` seconds
without bytes, and the relay then writes an SSE comment through the server's ``write``
callable so proxies and clients keep the connection open. It does so only at an event
boundary, so a heartbeat can never split an event; a failed heartbeat write means the
client is gone, and the read is abandoned.

When the client goes away the server stops iterating and calls ``close``, which closes the
upstream response: we stop reading upstream at once. ``on_close`` is called exactly once,
with the outcome, and the request's capacity slot (if any) is given back just before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import httpx

from apirouter.errors import ClientDisconnected, InternalError, RouterError
from apirouter.upstream import iter_raw, watch_idle

HEARTBEAT = b": heartbeat\n\n"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class Releasable(Protocol):
    def mark_stream(self) -> None: ...
    def release(self) -> None: ...


class _ClientGone(Exception):
    """A heartbeat could not be written: the client left during upstream silence."""


class SseRelay:
    def __init__(
        self,
        response: httpx.Response,
        heartbeat_seconds: float,
        on_close: Callable[[RouterError | None], None],
    ) -> None:
        self._response = response
        self._heartbeat = heartbeat_seconds
        self._on_close = on_close
        self._write: Callable[[bytes], Any] | None = None
        self._slot: Releasable | None = None
        self._tail = b"\n\n"  # nothing sent yet counts as a boundary
        self._done = False
        self._closed = False
        self._error: RouterError | None = None

    def relay_to(self, write: Callable[[bytes], Any]) -> SseRelay:
        """Give the relay the server's ``write`` (from start_response), for heartbeats."""
        self._write = write
        return self

    def hold(self, slot: Releasable) -> None:
        """Keep the request's capacity slot until the stream closes."""
        slot.mark_stream()
        self._slot = slot

    def __iter__(self) -> Iterator[bytes]:
        watching = self._write is not None and watch_idle(
            self._response, self._heartbeat, self._idle
        )
        try:
            for chunk in iter_raw(self._response):
                self._tail = chunk[-4:] if len(chunk) >= 4 else (self._tail + chunk)[-4:]
                yield chunk
            self._done = True
        except _ClientGone:
            return
        except RouterError as error:
            self._error, self._done = error, True
        except Exception as exc:
            if self._closed:  # the response was closed under us: nobody is listening
                return
            self._error = InternalError(f"The stream relay failed: {type(exc).__name__}")
            self._error.__cause__ = exc
            self._done = True
        finally:
            if watching:
                watch_idle(self._response, self._heartbeat, None)

    def _idle(self) -> None:
        """Upstream silence for a heartbeat interval: keep the client's connection alive."""
        if not self._tail.endswith(_BOUNDARIES) or self._write is None:
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
        watch_idle(self._response, self._heartbeat, None)
        self._response.close()
        if self._slot is not None:
            self._slot.release()
        error = self._error
        if error is None and not self._done:
            error = ClientDisconnected("The client closed the connection during the stream.")
        self._on_close(error)
