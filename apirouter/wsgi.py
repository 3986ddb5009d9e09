"""``apirouter.wsgi:application`` for running under another WSGI server.

    gunicorn --workers 1 --threads 32 'apirouter.wsgi:application'

Built from the environment exactly as ``apirouter serve`` builds it (``.env`` included),
with the provider from ``API_ROUTER_CONFIG_PATH`` (else qwen) and the config file watched
for hot reload. Import fails with one clear message if the environment is invalid.
"""

from __future__ import annotations

import threading

from apirouter import logs, server, tracking
from apirouter.app import build
from apirouter.settings import Settings, read_environment

settings = Settings.from_env(read_environment())
logs.setup(settings.log_format, settings.log_level)
application = build(settings, None, tracking_enabled=tracking.init(settings))
_forever = threading.Event()  # the host server owns the process: these run until it exits
threading.Thread(target=server.watch_config, args=(application, _forever), daemon=True).start()
threading.Thread(target=application.health_checker.run, args=(_forever,), daemon=True).start()
