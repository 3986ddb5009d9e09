"""HTTP/1.1 hardening on top of waitress's parser, for what the app never gets to see.

- RFC 9112 §6.1: a request with both ``Content-Length`` and ``Transfer-Encoding`` may be a
  smuggling attempt. waitress reads it by its chunked framing and keeps the connection
  open, so bytes hidden behind the chunked body were served as a second request. We
  answer 400 and close the connection, dropping whatever was pipelined behind it.
- waitress answers protocol errors itself with ``text/plain`` pages; ours carry the same
  status in the OpenAI error shape every client of the router already parses.
- Body limits before the body: waitress checks one server-wide limit and sends
  ``100 Continue`` regardless. Ours looks the route's limit up from the request line
  (``body_limit``, on the current hot-reloaded config): a declared ``Content-Length`` over
  it is answered 413 before a body byte is read (never a ``100 Continue``), and a chunked
  body is cut once it passes the limit (at most ``MIN_FEED`` bytes past it are decoded,
  and dropped at once). Either way the connection is closed, so nothing more of the body
  is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import Error, RequestEntityTooLarge

from apirouter import errors
from apirouter.server.waitress_internals import WatermarkChannel

# The largest body the route of a request target (its raw URI) accepts, in bytes.
BodyLimit = Callable[[str], int]
MIN_FEED = 64  # raw bytes of a chunked body parsed per step, at least


class JsonProtocolError(Error):
    """A waitress protocol error, rendered as ``{"error": {...}}``."""

    def __init__(self, original: Error) -> None:
        super().__init__(original.body)
        self.code = original.code
        self.reason = original.reason

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        error = {
            "message": f"{self.reason}: {self.body}",
            "type": "invalid_request_error",
            "code": _CODES.get(self.code, "protocol_error"),
        }
        body = json.dumps({"error": error}).encode()
        headers = [
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ]
        return f"{self.code} {self.reason}", headers, body


# the app's own codes for the same statuses, so a client sees one vocabulary
_CODES = {400: errors.BadRequest.error_type, 413: errors.PayloadTooLarge.error_type}


class StrictRequestParser(HTTPRequestParser):
    """waitress's request parser, stricter (see the module docstring)."""

    error: Any
    refused = False  # answered before its body: nothing more is read from the connection

    def __init__(
        self,
        adj: Adjustments,
        body_limit: BodyLimit | None = None,
        hold: Callable[[bytes], bool] | None = None,
    ) -> None:
        super().__init__(adj)
        self.body_limit = body_limit
        self.hold = hold  # the connection keeps bytes unparsed while its queue is full
        self.limit: int | None = None  # this request's body limit, once its headers are in

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            self.connection_close = True
            raise ParsingError("Content-Length and Transfer-Encoding must not both be sent")
        if self.body_limit is not None and (self.chunked or self.content_length > 0):
            self.limit = self.body_limit(self.request_uri)  # only requests with a body
            if self.content_length > self.limit:
                self._refuse(f"Request body of {self.content_length} bytes exceeds the limit")

    def received(self, data: bytes) -> int:
        if self.hold is not None and not self.header_bytes_received and self.hold(data):
            return len(data)  # not parsed yet: the connection holds the bytes
        given = data
        if self.limit is not None and self.chunked and not self.completed:
            data = data[: self._chunked_allowance()]  # never decode far past the limit
        consumed: int = super().received(data)
        if self.chunked and self.limit is not None and self._decoded() > self.limit:
            self._refuse("Request body exceeds the limit")
        if self.refused:  # waitress's own limit check may have replaced our error
            self.error = self._refusal
        if self.error is not None and not isinstance(self.error, JsonProtocolError):
            self.error = JsonProtocolError(self.error)
        if self.refused:  # what else arrived is body: dropped, never parsed as a request
            return len(given)
        return consumed

    def _refuse(self, reason: str) -> None:
        """Answer 413 now and close: the body is not read (and not spooled) any further."""
        self.error = self._refusal = RequestEntityTooLarge(f"{reason} of {self.limit} bytes.")
        self.close()  # what was spooled so far
        self.body_rcv, self.completed, self.refused = None, True, True
        self.expect_continue = False  # never a 100 Continue for a body we refuse
        self.connection_close = True

    def _decoded(self) -> int:
        receiver = self.body_rcv
        return 0 if receiver is None else len(receiver)

    def _chunked_allowance(self) -> int:
        """Raw bytes to hand to the chunked decoder: never so many that it could decode
        more than limit + ``MIN_FEED`` bytes (framing makes raw >= decoded), and never so
        few that framing fed byte by byte costs a call per byte."""
        assert self.limit is not None
        return max(MIN_FEED, self.limit + 1 - self._decoded())


class RouterChannel(WatermarkChannel):
    """waitress's connection handler with the strict parser."""

    def parser_class(self, adj: Adjustments) -> StrictRequestParser:
        """waitress builds each request's parser as ``self.parser_class(self.adj)``; ours
        also gets the server's body limit per route (``body_limit``), when it has one, and
        the connection's ``hold``."""
        return StrictRequestParser(adj, getattr(self.server, "body_limit", None), self.hold)

    def hold(self, data: bytes) -> bool:
        """Whether to keep ``data`` unparsed for now (see ``GuardedChannel``)."""
        return False
