"""The server harness: routers on the real embedded server, config files, docs blocks,
and a real redis-server for the fleet tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clocks import wait_until

from apirouter.proxy.app import App
from apirouter.server import channel
from apirouter.server import runner as server

SECRET_CLIENT_KEY = "sk-client-SECRET-0123456789abcdefghijklmnop"


SECRET_DEFAULT_KEY = "sk-default-SECRET-zyxwvutsrqponmlkjihgfedcba"


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
def running(app: App, threads: int | None = 16) -> Iterator[tuple[Any, threading.Event]]:
    """Run the app on the embedded server on a free loopback port; yield the server and
    the event that stops it (a test may set it to watch the shutdown)."""
    http_server = server.make_server(app, "127.0.0.1", 0, threads)
    stopping = threading.Event()
    thread = threading.Thread(
        target=server.run, args=(http_server, app), kwargs={"stopping": stopping}, daemon=True
    )
    thread.start()
    try:
        yield http_server, stopping
    finally:
        stopping.set()
        thread.join(timeout=15)


@contextmanager
def serving(app: App, threads: int = 16) -> Iterator[str]:
    """Run the app on the embedded server on a free loopback port; yield its URL."""
    with running(app, threads) as (http_server, _):
        yield channel.listen_urls(http_server)[0]


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def doc_blocks(path: Path, info: str) -> list[str]:
    """The fenced code blocks of a Markdown file whose info string is exactly `info`."""
    return re.findall(rf"^```{re.escape(info)}\n(.*?)^```", path.read_text(), re.M | re.S)


def run_bash(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a docs block as written, with this venv's `apirouter` first on PATH."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    """A real redis-server (Debian's package) on a free loopback port, no persistence.

    Started and stopped by pid; ``stop``/``start`` restart it on the same port (its data
    is gone, as after a crash), ``freeze``/``thaw`` stop and continue it (SIGSTOP/SIGCONT),
    which leaves connections open and unanswered."""

    port: int
    workdir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, timeout=10)
        return self

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
