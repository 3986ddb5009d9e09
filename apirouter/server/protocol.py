"""HTTP/1.1 hardening on top of waitress's parser, for what the app never gets to see.

- RFC 9112 §6.1: a request with both ``Content-Length`` and ``Transfer-Encoding`` may be a
  smuggling attempt. waitress reads it by its chunked framing and keeps the connection
  open, so bytes hidden behind the chunked body were served as a second request. We
  answer 400 and close the connection, dropping whatever was pipelined behind it.
- waitress answers protocol errors itself with ``text/plain`` pages; ours carry the same
  status in the OpenAI error shape every client of the router already parses.
"""

from __future__ import annotations

import json
from typing import Any

from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import Error

from apirouter.server.waitress_internals import WatermarkChannel


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
            "code": "bad_request" if self.code == 400 else "protocol_error",
        }
        body = json.dumps({"error": error}).encode()
        headers = [
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ]
        return f"{self.code} {self.reason}", headers, body


class StrictRequestParser(HTTPRequestParser):
    error: Any

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            self.connection_close = True
            raise ParsingError("Content-Length and Transfer-Encoding must not both be sent")

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if self.error is not None and not isinstance(self.error, JsonProtocolError):
            self.error = JsonProtocolError(self.error)
        return consumed


class RouterChannel(WatermarkChannel):
    """waitress's connection handler with the strict parser."""

    parser_class: Any = StrictRequestParser
