"""What the app answers: a status, headers and a body, or a relay of the upstream's body.

The WSGI entry point turns one ``Response`` into ``start_response`` plus an iterable, so
every route, local or proxied, ends the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from apirouter import errors
from apirouter.proxy.inbound import JSON
from apirouter.proxy.relay import Relay


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    error: errors.RouterError | None = None
    relay: Relay | None = field(default=None, repr=False)  # set: the body is relayed


def error_response(error: errors.RouterError, *, anthropic: bool = False) -> Response:
    """The error in OpenAI's shape, or (``anthropic``: on Anthropic's routes) in
    Anthropic's, so each SDK raises its own exception class with the message."""
    headers = [("Content-Type", JSON), *error.response_headers()]
    body = error.anthropic_body() if anthropic else error.body()
    return Response(error.status, headers, body, error)


def json_response(document: Any, status: int = 200) -> Response:
    return Response(status, [("Content-Type", JSON)], json.dumps(document).encode())


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Unknown')}"
