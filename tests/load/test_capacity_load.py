"""Load tests (``pytest -m load``): capacity, slow clients, probes and drain, on loopback.

Each test runs ``apirouter serve`` as a subprocess against the asyncio upstream of
``scripts/sse_upstream.py`` and drives it from asyncio in this process. They assert
outcomes (every stream completes, every probe answers, refusals are 503 over_capacity),
never wall-clock limits; every loop is bounded. About a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clocks import wait_until

pytestmark = pytest.mark.load

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def _open_files() -> None:
    """A thousand client sockets in this process need more than the usual 1,024 files."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "sse_upstream.py"), str(port)]
    )
    try:
        wait_until(lambda: listening(port), timeout=15)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    admin_port: int


@contextmanager
def serve(
    upstream_port: int, tmp_path: Path, *options: str, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """`apirouter serve` on free ports (main and admin), read from its banner."""
    config = tmp_path / "load.json"
    config.write_text(
        json.dumps({"name": "load", "baseUrl": f"http://127.0.0.1:{upstream_port}/v1"})
    )
    command = [sys.executable, "-m", "apirouter", "serve", "--config", str(config)]
    command += ["--port", "0", "--admin-port", "0", *options]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("APIROUTER_", "SENTRY_"))}
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**clean, **(env or {})}
    )
    try:
        banner = "".join(process.stderr.readline() for _ in range(6))
        ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", banner)]
        assert len(ports) >= 2, banner
        # keep reading its access log, or a full pipe would block the router mid-test
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield Served(process, ports[0], ports[-1])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


# --- an asyncio HTTP/1.1 client, just enough for SSE over chunked encoding -------------------


@dataclass
class Stream:
    status: int = 0
    retry_after: str | None = None
    body: bytes = b""
    events: int = 0
    first_at: float | None = None
    end_at: float | None = None
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


async def request(port: int, method: str, path: str, body: bytes = b"") -> Stream:
    result = Stream()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"{method} {path} HTTP/1.1\r\nHost: load\r\nContent-Type: application/json\r\n"
        writer.write(head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        result.status = int(status_line.split()[1])
        result.headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines if x)}
        result.retry_after = result.headers.get("retry-after")
        if result.headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readline()).strip(), 16):
                data = await reader.readexactly(size + 2)
                result.first_at = result.first_at or loop.time()
                result.events += data.count(b"\n\n")
                result.body += data[:-2]
            await reader.readline()
        else:
            result.body = await reader.readexactly(int(result.headers.get("content-length", 0)))
        result.end_at = loop.time()
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = repr(exc)
    return result


def stream_body(events: int, gap: float) -> bytes:
    return json.dumps({"model": "m", "stream": True, "events": events, "gap": gap}).encode()


def get(port: int, path: str) -> Stream:
    return asyncio.run(request(port, "GET", path))


# --- the tests ----------------------------------------------------------------------------


def test_a_thousand_concurrent_streams_all_complete_and_all_start_before_any_ends(
    upstream_port, tmp_path
):
    """Default settings. 20 events over about 8 s each: every stream is served at once."""

    async def run() -> list[Stream]:
        body = stream_body(20, 0.4)
        return await asyncio.gather(
            *(request(served.port, "POST", CHAT, body) for _ in range(1000))
        )

    with serve(upstream_port, tmp_path) as served:
        streams = asyncio.run(run())
        health = json.loads(get(served.admin_port, "/health").body)
    failed = [s for s in streams if s.error or s.status != 200 or s.events != 20]
    assert not failed, failed[:3]
    assert max(s.first_at for s in streams) < min(s.end_at for s in streams)
    assert health["capacity"]["in_flight"] == 0


def test_slowloris_cannot_stop_probes_or_real_requests(upstream_port, tmp_path):
    async def run() -> tuple[list[Stream], list[Stream]]:
        slow = []
        for _ in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(writer)
        probes, real = [], []
        for n in range(5):  # bounded: five rounds of a byte from every slow client
            for writer in slow:
                writer.write(b"X-Slow-%d: 1\r\n" % n)
            probes += [await request(served.port, "GET", "/health")]
            probes += [await request(served.admin_port, "GET", "/health")]
            real += [await request(served.port, "POST", CHAT, b'{"model": "m"}')]
        for writer in slow:
            writer.close()
        return probes, real

    with serve(upstream_port, tmp_path) as served:
        probes, real = asyncio.run(run())
    assert [p.status for p in probes] == [200] * len(probes)
    assert [r.status for r in real] == [200] * len(real)


def test_past_capacity_extra_requests_get_503_at_once_while_probes_answer(upstream_port, tmp_path):
    """50 slots, all held by streams; 30 more requests are refused before any stream ends."""

    async def run() -> tuple[list[Stream], list[Stream], list[Stream]]:
        body = stream_body(20, 0.3)
        held = [asyncio.create_task(request(served.port, "POST", CHAT, body)) for _ in range(50)]
        await asyncio.to_thread(
            wait_until,
            lambda: (
                json.loads(get(served.admin_port, "/health").body)["capacity"]["available"] == 0
            ),
            20,
        )
        extra = await asyncio.gather(
            *(request(served.port, "POST", CHAT, b'{"model": "m"}') for _ in range(30))
        )
        probes = [
            await request(port, "GET", path)
            for port in (served.port, served.admin_port)
            for path in ("/health", "/metrics", "/health/ready")
        ]
        return await asyncio.gather(*held), extra, probes

    with serve(upstream_port, tmp_path, "--max-concurrent", "50") as served:
        held, extra, probes = asyncio.run(run())
        metrics = get(served.admin_port, "/metrics").body.decode()
    assert all(s.status == 200 and s.events == 20 for s in held)
    assert all(r.status == 503 and r.retry_after == "1" for r in extra), extra[:3]
    assert all(json.loads(r.body)["error"]["code"] == "over_capacity" for r in extra)
    assert max(r.end_at for r in extra) < min(s.end_at for s in held)  # none waited for a slot
    assert [p.status for p in probes] == [200, 200, 503] * 2  # ready: no capacity left
    assert 'apirouter_requests_refused_total{reason="over_capacity"} 30.0' in metrics


def test_probes_answer_on_the_admin_port_when_every_worker_thread_is_busy(upstream_port, tmp_path):
    async def run() -> tuple[list[Stream], list[Stream]]:
        body = stream_body(10, 0.3)
        held = [asyncio.create_task(request(served.port, "POST", CHAT, body)) for _ in range(8)]
        await asyncio.to_thread(
            wait_until,
            lambda: json.loads(get(served.admin_port, "/health").body)["capacity"]["streams"] == 8,
            20,
        )
        probes = [await request(served.admin_port, "GET", p) for p in ("/health", "/metrics")]
        return await asyncio.gather(*held), probes

    with serve(upstream_port, tmp_path, "--threads", "8") as served:
        held, probes = asyncio.run(run())
    assert [p.status for p in probes] == [200, 200]
    assert all(s.status == 200 and s.events == 10 for s in held)


def test_after_sigterm_ready_is_503_while_requests_in_flight_finish(upstream_port, tmp_path):
    async def run() -> tuple[list[Stream], list[int]]:
        body = stream_body(20, 0.15)
        held = [asyncio.create_task(request(served.port, "POST", CHAT, body)) for _ in range(20)]
        await asyncio.to_thread(
            wait_until,
            lambda: json.loads(get(served.admin_port, "/health").body)["capacity"]["streams"] == 20,
            20,
        )
        served.process.send_signal(signal.SIGTERM)
        ready = await asyncio.to_thread(
            wait_until, lambda: get(served.admin_port, "/health/ready").status == 503, 10
        )
        in_flight = sum(not task.done() for task in held)
        return await asyncio.gather(*held), [ready, in_flight]

    with serve(upstream_port, tmp_path) as served:
        held, ready = asyncio.run(run())
        assert served.process.wait(30) == 0
    assert ready[0] and ready[1] > 0  # 503 while streams were still in flight
    assert all(s.status == 200 and s.events == 20 for s in held)


# --- clients that never read -----------------------------------------------------------------


def non_reader(port: int, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and never reads (a small receive buffer, so
    the router's answers back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def admin_health(served: Served) -> dict:
    return json.loads(get(served.admin_port, "/health").body)


def test_stalled_and_pipelining_clients_cannot_hold_the_router(upstream_port, tmp_path):
    """100 connections per port pipeline /metrics (main) or /health (admin) and never
    read; 20 clients stop reading 32 MiB answers. Probes and real requests are still answered, a stream silent past the
    write timeout is not cut, and once the write timeout has passed every slot is free."""
    pipelined = {
        path: b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path * 2000
        for path in (b"/metrics", b"/health")
    }
    download = b"GET /v1/files/file-%d/content HTTP/1.1\r\nHost: x\r\n\r\n" % (32 << 20)

    with serve(
        upstream_port,
        tmp_path,
        "--max-concurrent",
        "21",
        env={"APIROUTER_WRITE_TIMEOUT_SECONDS": "2"},
    ) as served:

        async def quiet_stream() -> Stream:  # silent for 3 s, past the 2 s write timeout
            return await request(served.port, "POST", CHAT, stream_body(3, 3.0))

        async def run() -> tuple[Stream, list[Stream], list[Stream]]:
            stream = asyncio.create_task(quiet_stream())
            await asyncio.to_thread(
                wait_until, lambda: admin_health(served)["capacity"]["streams"] == 1, 20
            )
            sockets = [non_reader(served.port, download) for _ in range(20)]
            sockets += [non_reader(served.port, pipelined[b"/metrics"]) for _ in range(100)]
            sockets += [non_reader(served.admin_port, pipelined[b"/health"]) for _ in range(100)]
            probes = [
                await request(port, "GET", "/health") for port in (served.port, served.admin_port)
            ]
            real = [await request(served.port, "POST", CHAT, b'{"model": "m"}')]
            await asyncio.to_thread(  # the write timeout frees every stalled slot
                wait_until, lambda: admin_health(served)["capacity"]["in_flight"] <= 1, 30
            )
            finished = await stream
            real.append(await request(served.port, "POST", CHAT, b'{"model": "m"}'))
            for sock in sockets:
                sock.close()
            return finished, probes, real

        finished, probes, real = asyncio.run(run())
        # every non-reader was disconnected: 100 pipelining per port, 20 downloads
        counts = wait_until(lambda: stalled_counts(served, {"/metrics": 100, "/health": 100}), 30)
    assert finished.status == 200 and finished.events == 3, finished
    assert [p.status for p in probes] == [200, 200]
    first, after = real
    assert first.status == 200 or (
        first.status == 503 and json.loads(first.body)["error"]["code"] == "over_capacity"
    )
    assert after.status == 200
    assert counts["/v1/files/{id}/content"] == 20


def stalled_counts(served: Served, at_least: dict[str, float]) -> dict[str, float] | None:
    """``client_stalled`` disconnects by route, once they reach ``at_least``."""
    metrics = get(served.admin_port, "/metrics").body.decode()
    found = re.findall(
        r'apirouter_client_disconnects_total\{reason="client_stalled",route="([^"]+)"\} (\S+)',
        metrics,
    )
    counts = {route: float(value) for route, value in found}
    return counts if all(counts.get(r, 0) >= n for r, n in at_least.items()) else None
