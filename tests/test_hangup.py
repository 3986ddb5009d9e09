"""The hang-up between the server's main loop and a request's worker: it shuts only the
upstream connection its own request is using, never one back in the pool or reused."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from apirouter.upstream import hangup


class Connection:
    """An upstream connection as the hang-up sees it, over a real socket pair."""

    def __init__(self) -> None:
        self.owner: hangup.Hangup | None = None
        self.ours, self.theirs = socket.socketpair()

    def raw_socket(self) -> socket.socket:
        return self.ours

    def shut(self) -> bool:
        """Whether our side was shut down (the peer then reads EOF)."""
        self.theirs.settimeout(0)
        try:
            return self.theirs.recv(1) == b""
        except BlockingIOError:
            return False


@pytest.fixture
def connection() -> Iterator[Connection]:
    made = Connection()
    yield made
    made.ours.close()
    made.theirs.close()


def serve(gone: hangup.Hangup | None, connection: Connection) -> None:
    """What a worker does: serve a request, writing its head on ``connection``."""
    hangup.serving(gone)
    hangup.claim(connection)


def test_a_hang_up_shuts_the_connection_its_request_is_waiting_on(connection):
    gone = hangup.Hangup()
    serve(gone, connection)
    gone.fire("client_disconnected")
    hangup.serving(None)
    assert connection.shut() and gone.reason == "client_disconnected"


def test_a_late_hang_up_never_shuts_a_connection_back_in_the_pool_or_reused(connection):
    first, second = hangup.Hangup(), hangup.Hangup()
    serve(first, connection)
    hangup.release_current()  # its response closed: the connection went back to the pool
    first.fire("client_disconnected")
    assert not connection.shut()
    serve(second, connection)  # another request reuses it
    first.fire("client_stalled")
    assert not connection.shut()
    second.fire("client_disconnected")
    hangup.serving(None)
    assert connection.shut()


def test_a_request_whose_client_left_before_it_was_sent_never_goes_out(connection):
    gone = hangup.Hangup()
    gone.fire("client_disconnected")
    serve(gone, connection)
    hangup.serving(None)
    assert connection.shut()


def test_requests_without_a_hang_up_release_what_an_earlier_one_claimed(connection):
    earlier = hangup.Hangup()
    serve(earlier, connection)
    serve(None, connection)  # a health check, or a request under another server
    earlier.fire("client_disconnected")
    assert not connection.shut()
