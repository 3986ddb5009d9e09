#!/usr/bin/env python3
"""Benchmark apirouter on loopback: CPU per request and per relayed event, capacity, probes.

Starts a local asyncio upstream (its own process, sharing the load generator's core), then
apirouter (`apirouter serve`, its own process, pinned to core 0), drives load from this
process (pinned to core 1), and reads the router's CPU time from /proc. Modes:

- ``cpu``: alternating rounds, a fresh router each: plain requests, then 20-event streams
  (events 5 ms apart, as a fast model streams), both at 8 connections. Reports medians:
  router CPU per plain request, per stream, and per relayed event = (CPU per 20-event
  stream - CPU per plain request) / 20. ``--baseline DIR`` alternates with another
  checkout's ``apirouter`` package (run with its own defaults) round by round,
  ``--sentry`` adds a round with Sentry enabled (no failures, so no events), and
  ``--nginx`` adds nginx proxying the same load (one worker on the same core, unbuffered,
  keep-alive upstream): what an event-loop proxy written in C costs on this machine, the
  reference the router's figures are read against (the VM's wake-up costs move both).
- ``streams``: N concurrent streams (default 1,000 of 20 events over 20 s): completions,
  time to first byte p50/p99, added delay per event p99 (upstream send to client receipt,
  both on CLOCK_MONOTONIC), whether every first byte arrived before any stream ended, peak
  router RSS, and /health latency on the main and admin ports while every slot is busy.
- ``slowloris``: N connections sending request headers one byte a second, while /health
  (main and admin port) and real requests are timed.

    python scripts/bench.py cpu --rounds 5
    python scripts/bench.py streams --streams 1000 --stream-seconds 20
    python scripts/bench.py slowloris --connections 1000
    python scripts/bench.py cpu --baseline /tmp/base   # alternate with another checkout
    python scripts/bench.py cpu --redis                # rate limit in process vs in Redis
    python scripts/bench.py cpu --nginx                # nginx on the same load, for reference

Figures depend on the machine; compare runs on the same one. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

UPSTREAM = Path(__file__).with_name("sse_upstream.py")
REPO = Path(__file__).resolve().parent.parent

PAYLOAD = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}


def stream_payload(events: int, gap: float) -> bytes:
    # asks for the final usage chunk, as SDK users with include_usage do: parsing is measured
    options = {"include_usage": True}
    return json.dumps(
        {"model": "m", "stream": True, "stream_options": options, "events": events, "gap": gap}
    ).encode()


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PinnedProcess:
    """A proxy under test on core 0, listening on ``port``; its CPU time read from /proc."""

    port: int
    process: subprocess.Popen[bytes]

    def _start(self, command: list[str], **popen: Any) -> None:
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
            **popen,
        )
        wait_listening(self.port)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


class RouterProcess(PinnedProcess):
    """`apirouter serve`; `admin_port` is None when the router has no admin port."""

    def __init__(self, config: Path, env: dict[str, str], args: argparse.Namespace) -> None:
        self.port = free_port()
        self.admin_port = free_port() if args.admin else None
        command = [sys.executable, "-m", "apirouter", "serve", "--config", str(config)]
        command += ["--port", str(self.port), *args.router_arg]
        if self.admin_port:
            command += ["--admin-port", str(self.admin_port)]
        # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: the
        # router runs in the checkout whose package it must import, never in ours by chance
        source = env.get("PYTHONPATH", str(REPO))
        self._start(command, env={**os.environ, **env, "PYTHONPATH": source}, cwd=source)


NGINX_CONF = """
worker_processes 1; daemon off; master_process off; pid {workdir}/nginx.pid;
error_log /dev/null;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
    }}
  }}
}}
"""


class NginxProcess(PinnedProcess):
    """nginx in front of the same upstream (one worker, unbuffered): the reference."""

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(nginx, os.X_OK):
            raise SystemExit("--nginx needs nginx installed (Debian: apt-get install nginx-light)")
        self.port = free_port()
        config = workdir / "nginx.conf"
        config.write_text(
            NGINX_CONF.format(workdir=workdir, upstream_port=upstream_port, port=self.port)
        )
        self._start([nginx, "-c", str(config), "-p", str(workdir), "-e", "/dev/null"])


# --- cpu mode -------------------------------------------------------------------------------


def load(port: int, total: int, connections: int, payload: bytes) -> list[float]:
    """Keep-alive POSTs from `connections` threads, bodies read whole; returns latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        mine = []
        for _ in range(total // connections):
            start = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", payload, HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"unexpected status {response.status}")
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def cpu_per_request(router: PinnedProcess, total: int, connections: int, payload: bytes) -> float:
    load(router.port, max(connections, total // 10), connections, payload)  # warm-up
    before = router.cpu()
    done = len(load(router.port, total, connections, payload))
    return (router.cpu() - before) / done


def two_upstreams(config: Path) -> Path:
    """The same upstream twice, as two weighted upstreams: the cost of choosing, none failing."""
    document = json.loads(config.read_text())
    base_url = document.pop("baseUrl")
    document["upstreams"] = [{"name": "a", "baseUrl": base_url}, {"name": "b", "baseUrl": base_url}]
    twin = config.with_name("two-upstreams.json")
    twin.write_text(json.dumps(document))
    return twin


def start_redis(port: int) -> subprocess.Popen:
    """A throwaway redis-server on the load generator's core: no persistence."""
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {1 % os.cpu_count()}),
    )
    wait_listening(port)
    return process


# A rate limit high enough never to refuse: what is measured is keeping it, not hitting it.
LIMIT = {"RATE_LIMIT_REQUESTS_PER_MINUTE": "100000000", "RATE_LIMIT_BURST": "100000000"}


def cpu_round(start: Callable[[], PinnedProcess], args: argparse.Namespace) -> tuple[float, ...]:
    """One round on a fresh proxy: CPU per plain request, per 20-event stream."""
    router = start()
    try:
        plain = cpu_per_request(router, args.requests, 8, PAYLOAD)
        stream = cpu_per_request(router, args.stream_requests, 8, stream_payload(20, args.gap))
    finally:
        router.stop()
    return plain, stream


def cpu_summary(label: str, rounds: list[tuple[float, ...]]) -> dict[str, Any]:
    plain = [r[0] for r in rounds]
    streams = [r[1] for r in rounds]
    per_plain, per_stream = statistics.median(plain), statistics.median(streams)
    return {
        "run": f"{label}: CPU at 8 connections, medians of {len(rounds)} alternating rounds",
        "plain_request_ms": round(per_plain * 1000, 3),
        "plain_request_ms_each_round": [round(v * 1000, 3) for v in plain],
        "stream_20_events_ms": round(per_stream * 1000, 3),
        "stream_ms_each_round": [round(v * 1000, 3) for v in streams],
        "per_relayed_event_us": round((per_stream - per_plain) / 20 * 1e6, 1),
    }


def cpu_mode(config: Path, upstream_port: int, args: argparse.Namespace) -> list[dict]:
    """Alternate this checkout with ``--baseline`` (another checkout's source), and the
    other variants asked for, per round."""

    def router(
        env: dict[str, str], variant_config: Path = config, variant_args: argparse.Namespace = args
    ) -> Callable[[], RouterProcess]:
        return functools.partial(RouterProcess, variant_config, env, variant_args)

    variants: dict[str, Callable[[], PinnedProcess]] = {"this": router({})}
    if args.sentry:  # the upstream doubles as a Sentry ingest that accepts every envelope
        variants["this, Sentry on"] = router(
            {"SENTRY_DSN": f"http://public@127.0.0.1:{upstream_port}/1"}
        )
    if args.two_upstreams:
        variants["this, two upstreams"] = router({}, two_upstreams(config))
    if args.redis_port:
        variants["this, rate limit in process"] = router(LIMIT)
        redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
        variants["this, rate limit in Redis"] = router({**LIMIT, "APIROUTER_REDIS_URL": redis_url})
    if args.baseline:
        old = argparse.Namespace(**{**vars(args), "admin": False, "router_arg": []})
        variants = {"baseline": router({"PYTHONPATH": args.baseline}, config, old), **variants}
    if args.nginx:
        variants["nginx (reference)"] = functools.partial(
            NginxProcess, upstream_port, config.parent
        )
    rounds: dict[str, list] = {label: [] for label in variants}
    for _ in range(args.rounds):  # alternate, fresh process each: clocks and neighbours drift
        for label, start in variants.items():
            rounds[label].append(cpu_round(start, args))
    return [cpu_summary(label, results) for label, results in rounds.items()]


# --- streams mode ---------------------------------------------------------------------------


async def read_chunked_events(reader: asyncio.StreamReader, on_event: Callable[[bytes], None]):
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        on_event(await reader.readexactly(size))
        await reader.readline()


async def one_stream(port: int, payload: bytes, record: dict[str, Any]) -> None:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        record["status"] = int(head.split(b" ", 2)[1])

        def on_event(data: bytes) -> None:
            now = time.monotonic()
            if "first" not in record:
                record["first"], record["first_at"] = now - start, now
            if data.startswith(b'data: {"i"'):
                sent = json.loads(data[6:])["t"]
                record["delays"].append((sent, now - sent))

        if record["status"] == 200:
            await read_chunked_events(reader, on_event)
        record["end"] = time.monotonic()
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        record["error"] = type(exc).__name__


async def probe_loop(url_ports: dict[str, int | None], stop: asyncio.Event) -> dict[str, list]:
    """GET /health on each port every 200 ms until `stop`; latencies (None = no answer in 2 s)."""
    results: dict[str, list] = {name: [] for name, port in url_ports.items() if port}
    while not stop.is_set():
        for name in results:
            results[name].append(await asyncio.to_thread(probe, url_ports[name], "/health"))
        await asyncio.sleep(0.2)
    return results


def probe(port: int, path: str, timeout: float = 2.0) -> float | None:
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        return time.perf_counter() - start if response.status == 200 else None
    except OSError:
        return None


def summarize_probes(probes: dict[str, list]) -> dict[str, Any]:
    summary = {}
    for name, values in probes.items():
        answered = [v for v in values if v is not None]
        summary[f"{name}_probes"] = f"{len(answered)}/{len(values)} answered"
        if answered:
            summary[f"{name}_probe_p50_ms"] = round(statistics.median(answered) * 1000, 1)
            summary[f"{name}_probe_max_ms"] = round(max(answered) * 1000, 1)
    return summary


async def streams_run(router: RouterProcess, args: argparse.Namespace) -> dict[str, Any]:
    gap = args.stream_seconds / 19
    payload = stream_payload(20, gap)
    records = [{"delays": []} for _ in range(args.streams)]
    stop = asyncio.Event()
    probes = asyncio.create_task(
        probe_loop({"main": router.port, "admin": router.admin_port}, stop)
    )
    await asyncio.sleep(0.5)
    limit = args.stream_seconds + 60  # bounded: a stuck stream is reported, not waited for
    await asyncio.gather(
        *(asyncio.wait_for(one_stream(router.port, payload, r), limit) for r in records),
        return_exceptions=True,
    )
    stop.set()
    ok = [r for r in records if r.get("status") == 200 and "end" in r]
    firsts = sorted(r["first"] for r in ok)
    delays = sorted(d for r in ok for _, d in r["delays"])
    ramped = max((r["first_at"] for r in ok), default=0.0)  # every stream had started
    steady = sorted(d for r in ok for sent, d in r["delays"] if sent > ramped)
    return {
        "run": f"{args.streams} concurrent streams of 20 events over {args.stream_seconds}s",
        "completed": len(ok),
        "refused_or_failed": len(records) - len(ok),
        "never_answered": sum("status" not in r for r in records),
        "answered_but_unfinished": sum("status" in r and "end" not in r for r in records),
        "ttfb_p50_ms": round(percentile(firsts, 0.5) * 1000, 1) if ok else None,
        "ttfb_p99_ms": round(percentile(firsts, 0.99) * 1000, 1) if ok else None,
        "event_delay_p50_ms": round(percentile(delays, 0.5) * 1000, 2) if delays else None,
        "event_delay_p99_ms": round(percentile(delays, 0.99) * 1000, 2) if delays else None,
        "event_delay_p99_after_all_started_ms": round(percentile(steady, 0.99) * 1000, 2)
        if steady
        else None,
        "every_first_byte_before_any_end": bool(ok)
        and max(r["first_at"] for r in ok) < min(r["end"] for r in ok),
        "router_peak_rss_mb": round(peak_rss_mb(router.process.pid), 1),
        **summarize_probes(await probes),
    }


def streams_mode(config: Path, args: argparse.Namespace) -> list[dict]:
    router = RouterProcess(config, {}, args)
    try:
        return [asyncio.run(streams_run(router, args))]
    finally:
        router.stop()


# --- slowloris mode -------------------------------------------------------------------------


async def slowloris_run(router: RouterProcess, args: argparse.Namespace) -> dict[str, Any]:
    writers = []
    for _ in range(args.connections):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", router.port)
        except OSError:
            break
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        writers.append(writer)
    stop = asyncio.Event()
    probes = asyncio.create_task(
        probe_loop({"main": router.port, "admin": router.admin_port}, stop)
    )
    real: list[bool] = []
    deadline = time.monotonic() + args.slowloris_seconds
    while time.monotonic() < deadline:
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"X")
        real.append(await asyncio.to_thread(real_request, router.port))
        await asyncio.sleep(1)
    stop.set()
    for writer in writers:
        writer.close()
    return {
        "run": f"{len(writers)} slowloris connections for {args.slowloris_seconds}s",
        "real_requests_ok": f"{sum(real)}/{len(real)}",
        **summarize_probes(await probes),
    }


def real_request(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", PAYLOAD, HEADERS)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def slowloris_mode(config: Path, args: argparse.Namespace) -> list[dict]:
    router = RouterProcess(config, {}, args)
    try:
        return [asyncio.run(slowloris_run(router, args))]
    finally:
        router.stop()


# --- main -----------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["cpu", "streams", "slowloris"])
    parser.add_argument("--requests", type=int, default=4000, help="plain requests per round")
    parser.add_argument("--stream-requests", type=int, default=400, help="streams per round")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between events")
    parser.add_argument("--rounds", type=int, default=5, help="alternating cpu rounds")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--stream-seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--slowloris-seconds", type=int, default=10)
    parser.add_argument("--baseline", help="cpu mode: also run this apirouter source dir")
    parser.add_argument("--sentry", action="store_true", help="cpu mode: also with Sentry on")
    parser.add_argument(
        "--two-upstreams", action="store_true", help="cpu mode: also with two upstreams"
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="cpu mode: also rate limiting in process vs in a local redis-server",
    )
    parser.add_argument(
        "--nginx", action="store_true", help="cpu mode: also nginx on the same load (reference)"
    )
    parser.add_argument("--no-admin", dest="admin", action="store_false", help="no --admin-port")
    parser.add_argument(
        "--router-arg", action="append", default=[], help="extra `apirouter serve` argument"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1 % os.cpu_count()})  # the load generator's core

    args.redis_port = free_port() if args.redis else None
    redis = start_redis(args.redis_port) if args.redis_port else None
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(UPSTREAM), str(upstream_port)])
    wait_listening(upstream_port)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.json"
        config.write_text(
            json.dumps({"name": "bench", "baseUrl": f"http://127.0.0.1:{upstream_port}/v1"})
        )
        try:
            if args.mode == "cpu":
                results = cpu_mode(config, upstream_port, args)
            elif args.mode == "streams":
                results = streams_mode(config, args)
            else:
                results = slowloris_mode(config, args)
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)
            if redis is not None:
                redis.terminate()
                redis.wait(timeout=10)
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
