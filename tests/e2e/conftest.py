"""End-to-end fixtures: a real Bugsink server and apirouter as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bugsink_server import BugsinkServer


@pytest.fixture(scope="session")
def bugsink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BugsinkServer]:
    server = BugsinkServer.start(tmp_path_factory.mktemp("bugsink"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RouterProcess:
    process: subprocess.Popen
    url: str
    banner: list[str]
    log: deque[str]  # the last lines of its stderr (read all along: a full pipe would block it)


def _drain(stream, into: deque[str]) -> None:
    for line in stream:
        into.append(line)


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Start ``apirouter serve`` as a subprocess; always stopped by pid afterwards."""
    started: list[subprocess.Popen] = []

    def start(config: dict[str, Any], env: dict[str, str]) -> RouterProcess:
        path = tmp_path / f"provider-{len(started)}.json"
        path.write_text(json.dumps(config))
        process = subprocess.Popen(
            [sys.executable, "-m", "apirouter", "serve", "--config", str(path), "--port", "0"],
            env={**os.environ, **env},
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        banner = [process.stderr.readline() for _ in range(3)]
        if "listening on" not in banner[0]:
            raise RuntimeError(f"apirouter did not start: {banner}")
        url = banner[0].split("listening on ")[1].strip()
        log: deque[str] = deque(maxlen=200)
        threading.Thread(target=_drain, args=(process.stderr, log), daemon=True).start()
        return RouterProcess(process, url, banner, log)

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
