"""Run the app on the embedded threaded server (waitress), sized for its capacity, and stop
it gracefully.

Sizing (waitress's defaults hold 100 connections and 4 threads, see DESIGN.md §7): each
proxied request in flight holds one worker thread for its whole life (a stream: minutes),
its client connection and one upstream connection. So for ``APIROUTER_MAX_CONCURRENT`` N:

- threads = N + ``SPARE_THREADS``: the capacity gate admits at most N proxied requests,
  so the spare threads are always free to answer /health, /metrics and the 503 refusals at
  once instead of queueing them behind streams;
- connection limit = N + max(N, ``CONNECTION_HEADROOM``): room for idle keep-alive and
  slow clients besides the N busy ones, within the open-files limit (raised from soft to
  hard at start-up), where each busy request also needs an upstream socket.

Slow clients are ``channel``'s business (a deadline for a request still arriving).

Graceful shutdown on SIGINT/SIGTERM: /health/ready turns 503 at once (the gate drains),
stop accepting, let requests in flight finish (up to ``APIROUTER_SHUTDOWN_GRACE_SECONDS``;
long streams are then cut), flush Sentry, close the upstream pool, stop the admin listener.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from waitress import wasyncore
from waitress.server import BaseWSGIServer

from apirouter.config.provider import ProviderConfig
from apirouter.config.settings import Settings
from apirouter.observe import tracking
from apirouter.proxy.app import App
from apirouter.server.admin import AdminListener
from apirouter.server.channel import (
    LOOP_SECONDS,
    AnyServer,
    build_server,
    close_server,
)
from apirouter.server.mainloop import MainLoop
from apirouter.server.waitress_internals import socket_map

log = logging.getLogger("apirouter.server")
CONFIG_POLL_SECONDS = 1.0
SPARE_THREADS = 16
CONNECTION_HEADROOM = 1000
RESERVED_FILES = 64  # log files, the config, the admin listener, DNS, Sentry...
# --- sizing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """How the server is sized for a capacity, and what the open-files limit allows."""

    max_concurrent: int
    threads: int
    connection_limit: int
    open_files: int

    @property
    def connections_allowed(self) -> int:
        """Client connections the open-files limit allows while every slot proxies."""
        return max(0, self.open_files - RESERVED_FILES - self.max_concurrent)

    def describe(self) -> str:
        return (
            f"{self.max_concurrent} requests in flight; {self.threads} threads; "
            f"{self.connection_limit} connections (open files {self.open_files} "
            f"allow {self.connections_allowed})"
        )


def size_for(max_concurrent: int, threads: int | None, open_files: int) -> Sizing:
    """Threads and connection limit for ``max_concurrent`` proxied requests in flight."""
    wanted = max_concurrent + max(max_concurrent, CONNECTION_HEADROOM)
    allowed = max(open_files - RESERVED_FILES - max_concurrent, 16)
    return Sizing(
        max_concurrent=max_concurrent,
        threads=threads or max_concurrent + SPARE_THREADS,
        connection_limit=min(wanted, allowed),
        open_files=open_files,
    )


def with_options(
    settings: Settings, max_concurrent: int | None, admin_port: int | None
) -> Settings:
    """Settings with ``serve``'s --max-concurrent / --admin-port applied (they win)."""
    if max_concurrent is not None:
        settings = replace(settings, max_concurrent=max_concurrent)
    if admin_port is not None:
        settings = replace(settings, admin_port=admin_port)
    return settings


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (each connection is a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %s to %s", soft, target)
    return soft


def make_server(app: App, host: str, port: int, threads: int | None = None) -> AnyServer:
    """The app's server, sized for its capacity, plus its admin listener if configured.

    The admin listener (``server.admin``) is bound here too, so a port in use fails
    start-up at once. Each request's body is limited by its route (``App.body_limit``)
    before a byte of it is read; waitress's own limit is only a backstop above them.
    """
    settings = app.settings
    sizing = size_for(settings.max_concurrent, threads, raise_open_files_limit())
    server = build_server(
        app,
        host,
        port,
        sizing.threads,
        sizing.connection_limit,
        settings.header_timeout,
        lambda: app.metrics.requests_refused.labels("header_timeout").inc(),
        body_limit=app.body_limit,
        write_timeout=settings.write_timeout,
        on_stalled=app.client_stalled,
        max_request_body_size=body_backstop(settings.max_body_bytes, app.store.current),
    )
    server.sizing = sizing
    server.admin = None
    if settings.admin_port is not None:
        try:
            server.admin = AdminListener(app, host, settings.admin_port)
        except OSError as exc:
            close_server(server)
            raise OSError(exc.errno, f"admin port {settings.admin_port}: {exc.strerror}") from None
    return server


def body_backstop(default_limit: int, config: ProviderConfig) -> int:
    """waitress's own request body limit: above every route's, so the app decides.

    waitress spools a body to a temporary file before the app sees it, and refuses one
    over this limit at once (a declared length, from the headers). Twice the largest route
    limit leaves room for chunked framing (counted by waitress). Fixed at start-up: a
    reloaded config that raises a route's ``maxBodyBytes`` above it needs a restart.
    """
    limits = [default_limit]
    for provider in (config, *config.fallbacks):
        limits += [e.max_body_bytes for e in provider.endpoints.values() if e.max_body_bytes]
    return max(limits) * 2 + 1024 * 1024


def banner_lines(server: AnyServer) -> list[str]:
    """What the start-up banner says about capacity and the admin listener."""
    lines = [f"capacity {server.sizing.describe()}"]
    admin = getattr(server, "admin", None)
    if admin is not None:
        lines.append(f"admin    {admin.url}: /health, /health/ready, /metrics")
    return lines


# --- running ---------------------------------------------------------------------------------


def run(
    server: AnyServer,
    app: App,
    on_ready: Callable[[], None] = lambda: None,
    stopping: threading.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``stopping`` is set), then shut down gracefully."""
    stopping = stopping or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: _drain(app, stopping))
    watcher = threading.Thread(target=watch_config, args=(app, stopping), daemon=True)
    watcher.start()
    threading.Thread(target=app.health_checker.run, args=(stopping,), daemon=True).start()
    if app.reporter.monitor is not None:  # the dead man's switch
        threading.Thread(target=app.reporter.monitor.run, args=(stopping,), daemon=True).start()
    admin = getattr(server, "admin", None)
    if admin is not None:
        admin.start()
    loop_map = socket_map(server)
    loop = MainLoop(loop_map)
    on_ready()
    try:
        while not stopping.is_set():
            loop.turn(LOOP_SECONDS)
        _drain(app, stopping)
        log.info("shutting down: no new connections; waiting for requests in flight")
        _stop_listening(loop_map)
        deadline = time.monotonic() + app.settings.shutdown_grace
        while app.reporter.in_flight > 0 and time.monotonic() < deadline:
            loop.turn(0.1)
    finally:
        server.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(loop_map)
        loop.close()
        app.close()
        tracking.flush()
        if admin is not None:
            admin.stop()  # last: /health/ready said 503 until the very end
        log.info("stopped")


def _drain(app: App, stopping: threading.Event) -> None:
    """From now on /health/ready answers 503; the serve loop then stops accepting."""
    app.capacity.draining.set()
    stopping.set()


def watch_config(app: App, stopping: threading.Event) -> None:
    while not stopping.wait(CONFIG_POLL_SECONDS):
        try:
            app.store.reload_if_changed()
        except Exception:
            log.exception("config watcher failed")


def _stop_listening(socket_map: dict[int, Any]) -> None:
    for dispatcher in list(socket_map.values()):
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.accepting = False
            dispatcher.del_channel()
            dispatcher.socket.close()
