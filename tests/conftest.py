"""Shared fixtures: the real app served by the real embedded server over loopback, a
pytest-httpserver upstream, and a local Sentry ingest endpoint that receives the SDK's
real envelopes."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from apirouter import logs, server, tracking
from apirouter.app import App
from apirouter.config import ConfigStore, load_file
from apirouter.settings import Settings

SECRET_CLIENT_KEY = "sk-client-SECRET-0123456789abcdefghijklmnop"
SECRET_DEFAULT_KEY = "sk-default-SECRET-zyxwvutsrqponmlkjihgfedcba"
DSN_SECRET = "0123456789abcdef0123456789abcdef"


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until predicate() is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class Router:
    app: App
    url: str  # http://127.0.0.1:PORT
    config_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextmanager
def serving(app: App, threads: int = 16) -> Iterator[str]:
    """Run the app on the embedded server on a free loopback port."""
    http_server = server.make_server(app, "127.0.0.1", 0, threads)
    stopping = threading.Event()
    thread = threading.Thread(
        target=server.run, args=(http_server, app), kwargs={"stopping": stopping}, daemon=True
    )
    thread.start()
    try:
        yield server.listen_urls(http_server)[0]
    finally:
        stopping.set()
        thread.join(timeout=15)


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="session")
def _upstream_server() -> Iterator[HTTPServer]:
    upstream = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture
def httpserver(_upstream_server: HTTPServer) -> Iterator[HTTPServer]:
    """The upstream: a threaded pytest-httpserver (streams and concurrency work), cleared
    between tests; started once per session because stopping one takes half a second."""
    _upstream_server.clear()
    yield _upstream_server
    _upstream_server.clear()


@pytest.fixture
def make_router(httpserver: HTTPServer, tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """Build and serve a router whose provider points at the httpserver upstream."""
    stack: list[Any] = []

    def make(
        config: dict[str, Any] | None = None,
        tracking_enabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **settings: Any,
    ) -> Router:
        document = {"name": "testprov", "baseUrl": httpserver.url_for("/v1"), **(config or {})}
        path = write_config(tmp_path / f"provider-{len(stack)}.json", document)
        app = App(
            ConfigStore(load_file(path), path),
            Settings.defaults(**settings),
            tracking_enabled=tracking_enabled,
            clock=clock,
        )
        context = serving(app)
        url = context.__enter__()
        stack.append(context)
        return Router(app, url, path)

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    return make_router()


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Capture apirouter's log output (text format) as a list of lines."""

    class Sink:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, text: str) -> None:
            self.lines.extend(line for line in text.splitlines() if line)

        def flush(self) -> None:
            pass

    sink = Sink()
    logger = logging.getLogger("apirouter")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logs.setup("text", stream=sink)
    yield sink.lines
    logger.handlers[:], logger.propagate, logger.level = saved


# --- the Sentry ingest endpoint ---------------------------------------------------------------


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

    @property
    def dsn(self) -> str:
        return f"http://public:{DSN_SECRET}@127.0.0.1:{self.server.port}/1"

    def handle(self, request: Request) -> Response:
        self.auth_headers.append(request.headers.get("X-Sentry-Auth", ""))
        envelope = decode_envelope(request.get_data(), request.headers.get("Content-Encoding"))
        self.envelopes.append(envelope)
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        body = json.dumps({"id": envelope.headers.get("event_id")}) if self.status == 200 else "{}"
        return Response(body, status=self.status, headers=headers, content_type="application/json")

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for envelope in self.envelopes for event in envelope.events]

    def wait_for_events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        tracking.flush()
        wait_until(lambda: len(self.events) >= count, timeout)
        return self.events

    def raw_bytes(self) -> bytes:
        return b"\n".join(e.raw for e in self.envelopes)


@pytest.fixture(scope="session")
def _ingest_server() -> Iterator[HTTPServer]:
    http = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    http.start()
    yield http
    http.stop()


@pytest.fixture
def ingest(_ingest_server: HTTPServer) -> Iterator[Ingest]:
    _ingest_server.clear()
    recorder = Ingest(_ingest_server)
    _ingest_server.expect_request("/api/1/envelope/", method="POST").respond_with_handler(
        recorder.handle
    )
    yield recorder
    _ingest_server.clear()


@pytest.fixture
def sentry(ingest: Ingest) -> Iterator[Callable[..., Settings]]:
    """Enable the real Sentry SDK against the local ingest; returns the settings used."""

    def enable(**overrides: Any) -> Settings:
        settings = Settings.defaults(sentry_dsn=ingest.dsn, **overrides)
        assert tracking.init(settings)
        return settings

    yield enable
    tracking.shutdown()
