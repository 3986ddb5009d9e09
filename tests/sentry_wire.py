"""Sentry at the wire: a local ingest endpoint that records the SDK's real envelopes, and
their decoder."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clocks import wait_until
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from apirouter.observe import tracking

DSN_SECRET = "0123456789abcdef0123456789abcdef"


@dataclass
class Envelope:
    headers: dict[str, Any]
    items: list[tuple[dict[str, Any], bytes]]
    raw: bytes

    @property
    def events(self) -> list[dict[str, Any]]:
        return [
            json.loads(payload) for header, payload in self.items if header.get("type") == "event"
        ]


def decode_envelope(body: bytes, encoding: str | None) -> Envelope:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    elif encoding == "br":
        import brotli  # only if the SDK found it installed

        body = brotli.decompress(body)
    position = _line_end(body, 0)
    headers = json.loads(body[:position])
    items = []
    position += 1
    while position < len(body):
        end = _line_end(body, position)
        if not body[position:end].strip():
            position = end + 1
            continue
        item_header = json.loads(body[position:end])
        position = end + 1
        length = item_header.get("length")
        end = position + length if length is not None else _line_end(body, position)
        items.append((item_header, body[position:end]))
        position = end + 1
    return Envelope(headers, items, body)


def _line_end(data: bytes, start: int) -> int:
    end = data.find(b"\n", start)
    return len(data) if end == -1 else end


@dataclass
class Ingest:
    """A local Sentry ingest endpoint that records every envelope it receives."""

    server: HTTPServer
    envelopes: list[Envelope] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    status: int = 200
    retry_after: str | None = None
    # per-envelope answer (status, Retry-After), overriding the two knobs above when set
    answer: Callable[[Envelope], tuple[int, str | None]] | None = None
    received_at: list[float] = field(default_factory=list)  # time.monotonic() per envelope

    @property
    def dsn(self) -> str:
        return f"http://public:{DSN_SECRET}@127.0.0.1:{self.server.port}/1"

    def handle(self, request: Request) -> Response:
        self.auth_headers.append(request.headers.get("X-Sentry-Auth", ""))
        envelope = decode_envelope(request.get_data(), request.headers.get("Content-Encoding"))
        status, retry_after = (
            self.answer(envelope) if self.answer else (self.status, self.retry_after)
        )
        self.received_at.append(time.monotonic())
        self.envelopes.append(envelope)
        headers = {"Retry-After": retry_after} if retry_after else {}
        body = json.dumps({"id": envelope.headers.get("event_id")}) if status == 200 else "{}"
        return Response(body, status=status, headers=headers, content_type="application/json")

    def check_ins(self) -> list[dict[str, Any]]:
        """Cron check-ins (the dead man's switch), oldest first."""
        return [
            json.loads(payload)
            for envelope in list(self.envelopes)
            for header, payload in envelope.items
            if header.get("type") == "check_in"
        ]

    def alerts(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "alert_type" in (e.get("tags") or {})]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for envelope in self.envelopes for event in envelope.events]

    def wait_for_events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        tracking.flush()
        wait_until(lambda: len(self.events) >= count, timeout)
        return self.events

    def raw_bytes(self) -> bytes:
        return b"\n".join(e.raw for e in self.envelopes)
