"""Shared fixtures: the real app served by the real embedded server over loopback, a
pytest-httpserver upstream, and a local Sentry ingest endpoint that receives the SDK's
real envelopes."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import RedisServer, Router, free_port, serving, write_config
from pytest_httpserver import HTTPServer
from sentry_wire import Ingest

from apirouter.config.provider import load_file
from apirouter.config.settings import Settings
from apirouter.observe import logs, tracking
from apirouter.proxy.app import App


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
    with _routers(httpserver, tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_router(
    _upstream_server: HTTPServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Router]]:
    """As make_router, for module-scoped fixtures: one router serves a whole module, since
    stopping one costs 0.2 s. Only for tests that do not count its metrics or buckets; they
    still take ``httpserver`` for a cleared upstream."""
    with _routers(_upstream_server, tmp_path_factory.mktemp("routers")) as make:
        yield make


@contextmanager
def _routers(upstream: HTTPServer, folder: Path) -> Iterator[Callable[..., Router]]:
    stack: list[Any] = []

    def make(
        config: dict[str, Any] | None = None,
        tracking_enabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **settings: Any,
    ) -> Router:
        config = config or {}
        default_upstream = {} if "upstreams" in config else {"baseUrl": upstream.url_for("/v1")}
        document = {"name": "testprov", **default_upstream, **config}
        path = write_config(folder / f"provider-{len(stack)}.json", document)
        app = App(
            load_file(path),
            Settings.defaults(**settings),
            config_path=path,
            tracking_enabled=tracking_enabled,
            clock=clock,
        )
        context = serving(app)
        url = context.__enter__()
        stack.append(context)
        return Router(app, url, path)

    try:
        yield make
    finally:
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


# --- a real redis-server -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (scripts/test.sh installs it when missing)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/test.sh (it installs it)")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied before each test; restarted if a test stopped it."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.thaw()
    redis_server.client().flushall()
    yield redis_server.url
    if redis_server.process is None:
        redis_server.start()
    redis_server.thaw()
