"""``apirouter.wsgi:application`` for running under another WSGI server.

    gunicorn --workers 4 --threads 32 'apirouter.wsgi:application'

Built from the environment exactly as ``apirouter serve`` builds it (``.env`` included),
with the provider from ``API_ROUTER_CONFIG_PATH`` (else qwen) and the config file watched
for hot reload. Import fails with one clear message if the environment is invalid.

Several workers: set ``APIROUTER_REDIS_URL`` so limits and alerts are shared, and
``PROMETHEUS_MULTIPROC_DIR`` so ``/metrics`` reports the whole server. Sentry, the config
watcher, the health checker and the metrics publisher start in each worker on its first
request, after the fork (``workers.PerProcess``), with or without ``--preload``.

With ``APIROUTER_ADMIN_PORT`` set, the admin listener (/health, /health/ready, /metrics on
their own thread, ``apirouter.server.admin``) starts when this module is imported, bound to all
interfaces, so probes answer however busy gunicorn's threads are (with several workers,
the first one to import holds the port; the others log it and go on). SIGTERM handling
is gunicorn's; the worker's handler is chained so that /health/ready answers 503 from that
moment (not with ``--preload``, where the app is built before gunicorn installs its
handlers).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from apirouter.config.settings import Settings, read_environment
from apirouter.observe import logs
from apirouter.ops import gc_tuning
from apirouter.ops.workers import PerProcess
from apirouter.proxy.app import build
from apirouter.server.admin import AdminListener

settings = Settings.from_env(read_environment())
logs.setup(settings.log_format, settings.log_level)
# tracking.init(settings) is True exactly when a DSN is set; it runs per process, later.
_app = build(settings, None, tracking_enabled=bool(settings.sentry_dsn))
application = PerProcess(_app, settings)

admin: AdminListener | None = None
if settings.admin_port is not None:
    try:
        admin = AdminListener(_app, "0.0.0.0", settings.admin_port).start()
    except OSError as exc:  # another worker process holds the port
        logging.getLogger("apirouter.admin").warning(
            "admin port %s not opened in this process: %s", settings.admin_port, exc.strerror
        )


def _drain_then(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        _app.capacity.draining.set()
        previous(signum, frame)

    return handler


if threading.current_thread() is threading.main_thread():
    _previous = signal.getsignal(signal.SIGTERM)
    if callable(_previous):
        signal.signal(signal.SIGTERM, _drain_then(_previous))

gc_tuning.tune()  # last: whatever importing built stays out of every collection
