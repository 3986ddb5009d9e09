"""waitress's private names, reached from here only (see ``apirouter.private``).

waitress's public API is ``serve``/``create_server`` and ``Adjustments``; the router
subclasses its channel, task, server and dispatcher (``channel.py``, ``protocol.py``),
whose attributes are undocumented but not underscored. Two names are private:

- a server's ``_map``: the socket map its main loop polls. The router runs that loop
  itself (``wasyncore.loop``), to drain gracefully and to run the admin listener on a
  thread of its own; ``MultiSocketServer`` exposes it as ``map``, a single server only as
  ``_map``.
- ``HTTPChannel._flush_outbufs_below_high_watermark``: where a worker waits for a slow
  reader. ``GuardedChannel`` must know when a worker waits there, because it keeps the
  main loop from polling a socket the worker is writing to.
"""

from __future__ import annotations

from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

from apirouter.private import PrivateName

PRIVATE_NAMES = (
    PrivateName(BaseWSGIServer, "_map", "the socket map its main loop polls", on_instances=True),
    PrivateName(
        HTTPChannel, "_flush_outbufs_below_high_watermark", "a worker's wait on a slow reader"
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
