"""The admin listener: /health, /health/ready and /metrics on their own port and threads.

Why a second listener: on the main port a probe shares the accept queue, the main loop
and the worker pool with every client. The capacity gate keeps spare workers for local
routes, but a flood of clients (or slow ones) still stands between a probe and its answer,
and a liveness probe that times out restarts a healthy router in its busiest minute. The
admin listener has its own socket, main-loop thread and two workers, and shares only the
app's state (the same handlers, metrics and capacity gate). It stays up through shutdown,
so /health/ready can answer 503 until the process exits.

Under gunicorn, ``apirouter.wsgi`` starts it in the worker when ``APIROUTER_ADMIN_PORT``
is set (one worker per port: run gunicorn with ``--workers 1``, as the README says).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from apirouter.errors import NotFound
from apirouter.proxy.app import ADMIN_ENVIRON_KEY, App
from apirouter.server.channel import LOOP_SECONDS, build_server, close_server, listen_urls
from apirouter.server.mainloop import MainLoop
from apirouter.server.waitress_internals import socket_map

ADMIN_PATHS = frozenset({"/health", "/health/ready", "/metrics"})
ADMIN_THREADS = 2
ADMIN_CONNECTIONS = 256
ADMIN_BODY_BYTES = 64 * 1024  # probes and scrapes send none: a body never spools more


def admin_app(app: App) -> Callable[..., Iterable[bytes]]:
    """A WSGI app that serves the admin paths through ``app`` and 404 for anything else."""

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") in ADMIN_PATHS:
            environ[ADMIN_ENVIRON_KEY] = True
            return app(environ, start_response)  # type: ignore[return-value]
        error = NotFound("The admin port serves /health, /health/ready and /metrics only.")
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [error.body()]

    return application


class AdminListener:
    """A small waitress server of its own, run by its own thread between start and stop."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.server = build_server(
            admin_app(app),
            host,
            port,
            ADMIN_THREADS,
            ADMIN_CONNECTIONS,
            app.settings.header_timeout,
            lambda: app.metrics.requests_refused.labels("header_timeout").inc(),
            body_limit=lambda target: ADMIN_BODY_BYTES,
            write_timeout=app.settings.write_timeout,
            on_stalled=app.client_stalled,
            max_request_body_size=ADMIN_BODY_BYTES + 1,
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="apirouter-admin", daemon=True)

    @property
    def url(self) -> str:
        return listen_urls(self.server)[0]

    def start(self) -> AdminListener:
        self._thread.start()
        return self

    def _loop(self) -> None:
        loop = MainLoop(socket_map(self.server))
        try:
            while not self._stopping.is_set():
                loop.turn(LOOP_SECONDS)
        finally:
            loop.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        close_server(self.server)
