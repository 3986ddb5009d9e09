"""``apirouter.wsgi:application`` for running under another WSGI server.

    gunicorn --workers 4 --threads 32 'apirouter.wsgi:application'

Built from the environment exactly as ``apirouter serve`` builds it (``.env`` included),
with the provider from ``API_ROUTER_CONFIG_PATH`` (else qwen) and the config file watched
for hot reload. Import fails with one clear message if the environment is invalid.

Several workers: set ``APIROUTER_REDIS_URL`` so limits and alerts are shared, and
``PROMETHEUS_MULTIPROC_DIR`` so ``/metrics`` reports the whole server. Sentry, the config
watcher and the metrics publisher start in each worker on its first request, after the
fork (``workers.PerProcess``), with or without ``--preload``.
"""

from __future__ import annotations

from apirouter import logs
from apirouter.app import build
from apirouter.settings import Settings, read_environment
from apirouter.workers import PerProcess

settings = Settings.from_env(read_environment())
logs.setup(settings.log_format, settings.log_level)
# tracking.init(settings) is True exactly when a DSN is set; it runs per process, later.
application = PerProcess(
    build(settings, None, tracking_enabled=bool(settings.sentry_dsn)), settings
)
