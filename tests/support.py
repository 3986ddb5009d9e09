"""Test helpers shared by every test module (fixtures live in conftest.py)."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from apirouter import server, tracking
from apirouter.app import App

SECRET_CLIENT_KEY = "sk-client-SECRET-0123456789abcdefghijklmnop"
SECRET_DEFAULT_KEY = "sk-default-SECRET-zyxwvutsrqponmlkjihgfedcba"
DSN_SECRET = "0123456789abcdef0123456789abcdef"


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until predicate() is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


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
def serving(app: App, threads: int = 16) -> Iterator[str]:
    """Run the app on the embedded server on a free loopback port."""
    http_server = server.make_server(app, "127.0.0.1", 0, threads)
    stopping = threading.Event()
    thread = threading.Thread(
        target=server.run, args=(http_server, app), kwargs={"stopping": stopping}, daemon=True
    )
    thread.start()
    try:
        yield server.listen_urls(http_server)[0]
    finally:
        stopping.set()
        thread.join(timeout=15)


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


@dataclass
class Envelope:
    headers: dict[str, Any]
    items: list[tuple[dict[str, Any], bytes]]
    raw: bytes

    @property
    def events(self) -> list[dict[str, Any]]:
        return [
            json.loads(payload) for header, payload in self.items if header.get("type") == "event"
        ]


def decode_envelope(body: bytes, encoding: str | None) -> Envelope:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    elif encoding == "br":
        import brotli  # only if the SDK found it installed

        body = brotli.decompress(body)
    position = _line_end(body, 0)
    headers = json.loads(body[:position])
    items = []
    position += 1
    while position < len(body):
        end = _line_end(body, position)
        if not body[position:end].strip():
            position = end + 1
            continue
        item_header = json.loads(body[position:end])
        position = end + 1
        length = item_header.get("length")
        end = position + length if length is not None else _line_end(body, position)
        items.append((item_header, body[position:end]))
        position = end + 1
    return Envelope(headers, items, body)


def _line_end(data: bytes, start: int) -> int:
    end = data.find(b"\n", start)
    return len(data) if end == -1 else end


@dataclass
class Ingest:
    """A local Sentry ingest endpoint that records every envelope it receives."""

    server: HTTPServer
    envelopes: list[Envelope] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    status: int = 200
    retry_after: str | None = None
    # per-envelope answer (status, Retry-After), overriding the two knobs above when set
    answer: Callable[[Envelope], tuple[int, str | None]] | None = None
    received_at: list[float] = field(default_factory=list)  # time.monotonic() per envelope

    @property
    def dsn(self) -> str:
        return f"http://public:{DSN_SECRET}@127.0.0.1:{self.server.port}/1"

    def handle(self, request: Request) -> Response:
        self.auth_headers.append(request.headers.get("X-Sentry-Auth", ""))
        envelope = decode_envelope(request.get_data(), request.headers.get("Content-Encoding"))
        status, retry_after = (
            self.answer(envelope) if self.answer else (self.status, self.retry_after)
        )
        self.received_at.append(time.monotonic())
        self.envelopes.append(envelope)
        headers = {"Retry-After": retry_after} if retry_after else {}
        body = json.dumps({"id": envelope.headers.get("event_id")}) if status == 200 else "{}"
        return Response(body, status=status, headers=headers, content_type="application/json")

    def alerts(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "alert_type" in (e.get("tags") or {})]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for envelope in self.envelopes for event in envelope.events]

    def wait_for_events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        tracking.flush()
        wait_until(lambda: len(self.events) >= count, timeout)
        return self.events

    def raw_bytes(self) -> bytes:
        return b"\n".join(e.raw for e in self.envelopes)


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


class FakeClock:
    """An injected clock that tests move by hand, so windows and throttles never sleep."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_concurrently(work: Callable[[], None], threads: int) -> None:
    """Run `work` on `threads` threads released at the same instant; wait for all."""
    barrier = threading.Barrier(threads)

    def start_together() -> None:
        barrier.wait()
        work()

    pool = [threading.Thread(target=start_together) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


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
