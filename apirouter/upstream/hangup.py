"""A client's hang-up, told from the server's main loop to the request's worker thread.

The worker of a non-streaming request sits in a blocking read of the upstream socket (a
60 s reasoning call, say) and cannot notice its client leaving; the upstream would be paid
to the end for tokens no one reads. The server's main loop can notice (it reads the
client's EOF, or it disconnects a stalled client), so it ``fire``\\s the request's
``Hangup``: that records why, and shuts the upstream socket the request is using down,
which ends the worker's blocked read at once. The worker then reports the outcome as the
client's (``client_disconnected`` or ``client_stalled``), never as an upstream failure.

The server marks the thread serving a request (``serving``). A connection is *claimed*
by the request that writes its head on it (``claim``), and released when its response is
closed and it goes back to the pool (``release_current``, from the pool): a pooled
connection then belongs to no one, or to the later request that claims it, and an old
request's late hang-up can never shut it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Protocol

ENVIRON_KEY = "apirouter.hangup"  # where the embedded server puts a request's Hangup
_current = threading.local()  # the hang-up of the request this thread is serving
_owners = threading.Lock()  # claims and hang-ups: each once per request at most


class Claimable(Protocol):
    """An upstream connection: who sent on it last, and its socket."""

    owner: Hangup | None

    def raw_socket(self) -> Any: ...


class Hangup:
    """One request's hang-up: set by the server, read by the proxy, acted on here."""

    __slots__ = ("_claimed", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None  # "client_disconnected" or "client_stalled"
        self._claimed: Claimable | None = None

    def fire(self, reason: str) -> None:
        """The client is gone (main loop thread): end the upstream exchange at once."""
        with _owners:
            if self.reason is None:
                self.reason = reason
            connection = self._claimed
            if connection is not None and connection.owner is self:
                shut(connection.raw_socket())

    def disarm(self) -> None:
        """The request is done with its connection (its response is closed, and the
        connection goes back to the pool): a later hang-up must not shut it."""
        with _owners:
            connection, self._claimed = self._claimed, None
            if connection is not None and connection.owner is self:
                connection.owner = None


def shut(sock: Any) -> None:
    """Shut a socket down in both directions (its owner's blocked read returns at once);
    closing it is left to its owner. The base method, so a TLS socket is shut too."""
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError, TypeError):  # closed, or not a socket
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def serving(hangup: Hangup | None) -> None:
    """This thread now serves ``hangup``'s request (None: it is over): the connections
    it writes a request head to are claimed for it."""
    _current.hangup = hangup


def release_current() -> None:
    """A response this thread read is closed (its connection goes back to the pool)."""
    gone: Hangup | None = getattr(_current, "hangup", None)
    if gone is not None:
        gone.disarm()


def claim(connection: Claimable) -> None:
    """Called as a request's head is written on ``connection``: the request this thread
    serves (if it has a hang-up) owns it from now on, and no earlier one does."""
    hangup: Hangup | None = getattr(_current, "hangup", None)
    if hangup is None and connection.owner is None:
        return
    with _owners:
        connection.owner = hangup
        if hangup is not None:
            hangup._claimed = connection
            if hangup.reason is not None:  # gone before the request even went out
                shut(connection.raw_socket())
