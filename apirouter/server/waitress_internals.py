"""waitress's private names, reached from here only (see ``apirouter.private``).

waitress's public API is ``serve``/``create_server`` and ``Adjustments``; the router
subclasses its channel, parser, task, server and dispatcher (``channel.py``,
``protocol.py``), whose attributes are undocumented but not underscored: they are listed
below too, so that an upgrade that renames one fails the suite rather than a request.
Two names are private:

- a server's ``_map``: the socket map its main loop polls. The router runs that loop
  itself (``wasyncore.loop``), to drain gracefully and to run the admin listener on a
  thread of its own; ``MultiSocketServer`` exposes it as ``map``, a single server only as
  ``_map``. Its turns (``mainloop.MainLoop``) hand events to waitress's
  ``wasyncore.readwrite``, and fall back to its ``poll2`` where there is no epoll.
- ``HTTPChannel._flush_outbufs_below_high_watermark``: where a worker waits for a slow
  reader. ``GuardedChannel`` must know when a worker waits there, because it keeps the
  main loop from polling a socket the worker is writing to.
"""

from __future__ import annotations

from typing import Any

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

from apirouter.private import PrivateName

_UNDOCUMENTED: dict[type, tuple[str, ...]] = {
    # the connection: its parser and task classes, requests, output buffers and socket
    HTTPChannel: (
        "task_class",
        "parser_class",
        "request",
        "last_activity",
        "close_when_flushed",
        "total_outbufs_len",
        "connected",
        "write_soon",
        "received",
        "send",
        "handle_close",
        "will_close",
        "service",
        "readable",
        "writable",
    ),
    # the request parser: how much arrived, the body receiver, the 100-continue flag
    HTTPRequestParser: (
        "header_bytes_received",
        "body_rcv",
        "completed",
        "expect_continue",
        "content_length",
        "chunked",
        "connection_close",
        "error",
        "parse_header",
        "received",
        "close",
    ),
    # the task: its response head and body writes
    WSGITask: (
        "close_on_finish",
        "wrote_header",
        "content_bytes_written",
        "chunked_response",
        "complete",
        "has_body",
        "content_length",
        "write",
        "build_response_header",
        "service",
        "get_environment",
    ),
    # the server: accepting, the maintenance pass, the channel class
    TcpWSGIServer: ("channel_class", "maintenance", "handle_accept", "pull_trigger", "accepting"),
    ThreadedTaskDispatcher: ("set_thread_count", "shutdown"),
}
# set by __init__: checked on live objects
_ON_INSTANCES: dict[type, tuple[str, ...]] = {
    HTTPChannel: ("requests", "outbufs", "outbuf_lock", "adj", "server"),
    HTTPRequestParser: ("headers",),
    TcpWSGIServer: ("active_channels", "adj", "effective_host", "effective_port"),
    ThreadedTaskDispatcher: ("queue_cv", "lock"),
}
PRIVATE_NAMES = (
    PrivateName(BaseWSGIServer, "_map", "the socket map its main loop polls", on_instances=True),
    PrivateName(
        HTTPChannel, "_flush_outbufs_below_high_watermark", "a worker's wait on a slow reader"
    ),
    *(
        PrivateName(owner, name, "undocumented, relied on by channel.py and protocol.py")
        for owner, names in _UNDOCUMENTED.items()
        for name in names
    ),
    *(
        PrivateName(owner, name, "undocumented, set by __init__", on_instances=True)
        for owner, names in _ON_INSTANCES.items()
        for name in names
    ),
)


def socket_map(server: Any) -> dict[int, Any]:
    """The socket map a server's main loop polls (one server's, or a multi-socket one's)."""
    found: dict[int, Any] | None = getattr(server, "map", None)
    return found if found is not None else server._map


class WatermarkChannel(HTTPChannel):
    """``HTTPChannel`` whose wait for a slow reader is the public hook
    ``wait_below_watermark``, for subclasses to wrap."""

    def _flush_outbufs_below_high_watermark(self) -> None:
        self.wait_below_watermark()

    def wait_below_watermark(self) -> None:
        """Block (a worker, in ``write_soon``) until the unsent bytes fall below the
        watermark: waitress's own wait."""
        HTTPChannel._flush_outbufs_below_high_watermark(self)
