"""The server's main loop: which sockets to watch, one wait, waitress's handlers.

waitress's own turn (``wasyncore.poll2``) builds a new ``poll`` set each turn, asking every
connection ``readable()`` and then ``writable()`` and registering its socket again, and
the kernel then sets up a wait on every socket, every turn. That was a fifth of the
server's own work per plain request, since the main loop turns about once per request
and keeps every open connection readable (to see hang-ups, ``channel.py``).

``MainLoop`` keeps one ``epoll`` set for the loop's life instead: each turn it still asks
every connection what it waits for (a ``GuardedChannel`` answers in one call,
``poll_events``; the listener and the trigger are asked as waitress asks them), but tells
the kernel only what changed, which between requests is nothing. What happens on an event
is waitress's own (``wasyncore.readwrite``). Where there is no epoll (not Linux), each
turn is waitress's own.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any

from waitress import wasyncore

READ = select.POLLIN | select.POLLPRI
WRITE = select.POLLOUT


class MainLoop:
    """The turns of one server's main loop over its socket map (run by one thread)."""

    def __init__(self, socket_map: dict[int, Any]) -> None:
        self.socket_map = socket_map
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        # what the kernel watches for: fd -> (the dispatcher it was for, its events)
        self._watched: dict[int, tuple[Any, int]] = {}

    def turn(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for events on the map's sockets; handle them."""
        epoll = self._epoll
        if epoll is None:
            wasyncore.poll2(timeout, self.socket_map)
            return
        socket_map, watched = self.socket_map, self._watched
        for fd in watched.keys() - socket_map.keys():  # closed or removed since
            self._forget(fd)
        for fd, dispatcher in list(socket_map.items()):
            poll_events = getattr(dispatcher, "poll_events", None)
            if poll_events is not None:
                events = poll_events()
            else:
                events = READ if dispatcher.readable() else 0
                if dispatcher.writable() and not dispatcher.accepting:
                    events |= WRITE
            if watched.get(fd) != (dispatcher, events):
                self._watch(fd, dispatcher, events)
        for fd, events in epoll.poll(timeout):
            ready = socket_map.get(fd)
            if ready is not None:  # closed by an earlier handler in this turn
                wasyncore.readwrite(ready, events)

    def _watch(self, fd: int, dispatcher: Any, events: int) -> None:
        """Tell the kernel what ``fd`` waits for now. An fd waiting for nothing is left
        out, as waitress's poll leaves it out (epoll would still report its hang-up)."""
        assert self._epoll is not None
        if self.socket_map.get(fd) is not dispatcher:  # closed in this turn (maintenance)
            return
        if not events:
            self._forget(fd)
            return
        try:
            try:
                self._epoll.modify(fd, events)
            except FileNotFoundError:  # new, or a closed socket's number reused: not watched
                self._epoll.register(fd, events)
        except OSError:  # closed before its turn came: nothing to watch (as poll's POLLNVAL)
            self._forget(fd)
            return
        self._watched[fd] = (dispatcher, events)

    def _forget(self, fd: int) -> None:
        assert self._epoll is not None
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError):  # closed already: the kernel forgot it
                self._epoll.unregister(fd)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
