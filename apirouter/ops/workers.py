"""Per-process start-up for pre-forking WSGI servers (gunicorn ``-w N``, uWSGI).

Such a server imports ``apirouter.wsgi`` once, in its master with ``--preload`` or in each
worker without it, then forks. Threads do not survive a fork: the Sentry SDK's transport
thread, the config watcher, the metrics publisher. So they are started lazily, on a
process's first request, and again in any child forked after that
(``os.register_at_fork``). That works with or without ``--preload`` and needs no hooks
in a gunicorn config file. Per process:

- ``tracking.init`` (the SDK must be initialised after the fork, never before);
- the config file watcher (hot reload);
- in multiprocess metrics mode (``PROMETHEUS_MULTIPROC_DIR``): forget workers that have
  exited (their live gauges; their counters stay in the totals), then publish this
  worker's function gauges once a second.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

from apirouter.config.settings import Settings
from apirouter.observe import tracking
from apirouter.observe.metrics import multiprocess_dir
from apirouter.proxy.app import App
from apirouter.server import runner as server

PUBLISH_SECONDS = 1.0
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


class PerProcess:
    """The app as a WSGI callable that starts its per-process parts on first use."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._ready = False
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forked)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if not self._ready:
            self._start()
        return self.app(environ, start_response)

    def _forked(self) -> None:
        self._ready = False
        self._lock = threading.Lock()  # a lock held at fork time would stay held

    def _start(self) -> None:
        with self._lock:
            if self._ready:
                return
            tracking.init(self.settings)
            stopping = threading.Event()
            _daemon(server.watch_config, self.app, stopping)
            _daemon(_check_health, self.app, stopping)
            if self.app.reporter.monitor is not None:
                _daemon(_check_in, self.app, stopping)
            directory = multiprocess_dir()
            if directory:
                forget_exited_workers(Path(directory))
                _daemon(_publish, self.app, stopping)
            self._ready = True


def _daemon(
    target: Callable[[App, threading.Event], None], app: App, stop: threading.Event
) -> None:
    threading.Thread(target=target, args=(app, stop), daemon=True).start()


def _check_health(app: App, stopping: threading.Event) -> None:
    app.health_checker.run(stopping)


def _check_in(app: App, stopping: threading.Event) -> None:
    if app.reporter.monitor is not None:
        app.reporter.monitor.run(stopping)


def _publish(app: App, stopping: threading.Event) -> None:
    while not stopping.wait(PUBLISH_SECONDS):
        app.metrics.publish()


def forget_exited_workers(directory: Path) -> list[int]:
    """Drop the live gauges of processes that no longer exist (gunicorn's ``child_exit``
    hook would do the same; doing it here needs no config file)."""
    gone = []
    for path in directory.glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match and not _alive(int(match[1])):
            gone.append(int(match[1]))
    for pid in set(gone):
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(set(gone))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
