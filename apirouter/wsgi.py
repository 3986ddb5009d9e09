"""``apirouter.wsgi:application`` for running under another WSGI server.

    gunicorn --workers 1 --threads 1040 'apirouter.wsgi:application'

Built from the environment exactly as ``apirouter serve`` builds it (``.env`` included),
with the provider from ``API_ROUTER_CONFIG_PATH`` (else qwen) and the config file watched
for hot reload. Import fails with one clear message if the environment is invalid.

With ``APIROUTER_ADMIN_PORT`` set, the admin listener (/health, /health/ready, /metrics on
their own thread, ``apirouter.admin``) starts here too, bound to all interfaces, so probes
answer however busy gunicorn's threads are. SIGTERM handling is gunicorn's (it stops
accepting and waits for its graceful timeout); the worker's handler is chained so that
/health/ready answers 503 from that moment (not with ``--preload``, where the app is
built before gunicorn installs its handlers).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from apirouter import logs, server, tracking
from apirouter.admin import AdminListener
from apirouter.app import build
from apirouter.settings import Settings, read_environment

settings = Settings.from_env(read_environment())
logs.setup(settings.log_format)
application = build(settings, None, tracking_enabled=tracking.init(settings))
threading.Thread(
    target=server.watch_config, args=(application, threading.Event()), daemon=True
).start()
admin: AdminListener | None = None
if settings.admin_port is not None:
    try:
        admin = AdminListener(application, "0.0.0.0", settings.admin_port).start()
    except OSError as exc:  # a second worker process: the first one holds the port
        logging.getLogger("apirouter.admin").warning(
            "admin port %s not opened in this process: %s", settings.admin_port, exc.strerror
        )


def _drain_then(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        application.capacity.draining.set()
        previous(signum, frame)

    return handler


if threading.current_thread() is threading.main_thread():
    _previous = signal.getsignal(signal.SIGTERM)
    if callable(_previous):
        signal.signal(signal.SIGTERM, _drain_then(_previous))
