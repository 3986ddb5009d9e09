"""Relay an upstream SSE stream to the client as it arrives, with heartbeats.

A reader thread pulls raw bytes from the upstream into a small queue; the WSGI iterator
yields each chunk the moment it arrives (no buffering, no re-framing). When the upstream is
silent for ``heartbeat`` seconds, the iterator yields an SSE comment so proxies and clients
keep the connection open; it does so only at an event boundary, so it can never split an
event. When the client goes away the server stops iterating and calls ``close``, which
closes the upstream response: we stop reading upstream at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import httpx

from apirouter.errors import ClientDisconnected, InternalError, RouterError
from apirouter.upstream import iter_raw

HEARTBEAT = b": heartbeat\n\n"
_END = object()
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


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
        self._queue: queue.Queue[object] = queue.Queue(maxsize=64)
        self._closed = threading.Event()
        self._done = False
        self._error: RouterError | None = None
        self._reader = threading.Thread(target=self._read, name="apirouter-sse-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        item: object = _END
        try:
            for chunk in iter_raw(self._response):
                if not self._put(chunk):
                    return
        except RouterError as error:
            item = error
        except Exception as exc:  # the response was closed under us: nobody is listening
            if self._closed.is_set():
                return
            item = InternalError(f"The stream relay failed: {type(exc).__name__}")
            item.__cause__ = exc
        self._put(item)

    def _put(self, item: object) -> bool:
        """Queue an item, giving up once the client is gone (never block forever)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        tail = b"\n\n"  # nothing sent yet counts as a boundary
        while True:
            try:
                item = self._queue.get(timeout=self._heartbeat)
            except queue.Empty:
                if tail.endswith(_BOUNDARIES):
                    yield HEARTBEAT
                continue
            if item is _END:
                self._done = True
                return
            if isinstance(item, RouterError):
                self._error = item
                self._done = True
                return
            assert isinstance(item, bytes)
            tail = (tail + item)[-4:]
            yield item

    def close(self) -> None:
        """Called by the server once, after the last write or when the client left."""
        self._closed.set()
        self._response.close()
        error = self._error
        if error is None and not self._done:
            error = ClientDisconnected("The client closed the connection during the stream.")
        self._on_close(error)
