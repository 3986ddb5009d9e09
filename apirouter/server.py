"""Run the app on the embedded threaded server (waitress), and stop it gracefully.

Graceful shutdown on SIGINT/SIGTERM: stop accepting, let requests in flight finish (up to
``GRACE_SECONDS``; long streams are then cut), flush Sentry, close the upstream pool.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import create_server, wasyncore
from waitress.server import BaseWSGIServer

from apirouter import tracking
from apirouter.app import App
from apirouter.protocol import RouterChannel

log = logging.getLogger("apirouter.server")
GRACE_SECONDS = 10.0
CONFIG_POLL_SECONDS = 1.0


def make_server(app: App, host: str, port: int, threads: int) -> BaseWSGIServer:
    """A waitress server for the app. Its body limit is a backstop above the app's own."""
    http_server = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="apirouter",
        asyncore_use_poll=True,
        max_request_body_size=app.settings.max_body_bytes * 2 + 1024 * 1024,
        clear_untrusted_proxy_headers=True,
    )
    http_server.channel_class = RouterChannel
    return http_server


def listen_urls(server: BaseWSGIServer) -> list[str]:
    listeners = getattr(server, "effective_listen", None) or [
        (server.effective_host, server.effective_port)
    ]
    return [f"http://{f'[{h}]' if ':' in str(h) else h}:{p}" for h, p in listeners]


def run(
    server: BaseWSGIServer,
    app: App,
    on_ready: Callable[[], None] = lambda: None,
    stopping: threading.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``stopping`` is set), then shut down gracefully."""
    stopping = stopping or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())
    watcher = threading.Thread(target=watch_config, args=(app, stopping), daemon=True)
    watcher.start()
    threading.Thread(target=app.health_checker.run, args=(stopping,), daemon=True).start()
    socket_map = getattr(server, "map", None) or server._map
    on_ready()
    try:
        while not stopping.is_set():
            wasyncore.loop(timeout=0.2, map=socket_map, use_poll=True, count=1)
        log.info("shutting down: no new connections; waiting for requests in flight")
        _stop_listening(socket_map)
        deadline = time.monotonic() + GRACE_SECONDS
        while app.reporter.in_flight > 0 and time.monotonic() < deadline:
            wasyncore.loop(timeout=0.1, map=socket_map, use_poll=True, count=1)
    finally:
        server.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(socket_map)
        app.close()
        tracking.flush()
        log.info("stopped")


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
