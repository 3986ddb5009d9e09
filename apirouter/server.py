"""Run the app on the embedded threaded server (waitress), sized for its capacity, and stop
it gracefully.

Sizing (waitress's defaults hold 100 connections and 4 threads, see DESIGN.md §7): each
proxied request in flight holds one worker thread for its whole life (a stream: minutes),
its client connection and one upstream connection. So for ``APIROUTER_MAX_CONCURRENT`` N:

- threads = N + ``SPARE_THREADS``: the capacity gate admits at most N proxied requests,
  so the spare threads are always free to answer /health, /metrics and the 503 refusals at
  once instead of queueing them behind streams;
- connection limit = N + max(N, ``CONNECTION_HEADROOM``): room for idle keep-alive and
  slow clients besides the N busy ones, within the open-files limit (raised from soft to
  hard at start-up), where each busy request also needs an upstream socket.

Slow clients: waitress reads a request's headers and body in its main loop before a worker
sees it, with no deadline (``channel_timeout`` only notices *silence*, and one byte a
second is not silence). ``GuardedChannel`` times each request from its first byte (a new
connection: from its accept), and the server's maintenance pass answers 408 and closes any
whose headers and body are still arriving after ``APIROUTER_HEADER_TIMEOUT_SECONDS`` (plus
one second per ``BODY_ALLOWANCE_BYTES`` received, so large uploads on slow links pass).

Graceful shutdown on SIGINT/SIGTERM: /health/ready turns 503 at once (the gate drains),
stop accepting, let requests in flight finish (up to ``APIROUTER_SHUTDOWN_GRACE_SECONDS``;
long streams are then cut), flush Sentry, close the upstream pool, stop the admin listener.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.server import BaseWSGIServer, MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

from apirouter import tracking
from apirouter.app import App
from apirouter.config import ProviderConfig
from apirouter.protocol import RouterChannel
from apirouter.settings import Settings

log = logging.getLogger("apirouter.server")
CONFIG_POLL_SECONDS = 1.0
SPARE_THREADS = 16
CONNECTION_HEADROOM = 1000
RESERVED_FILES = 64  # log files, the config, the admin listener, DNS, Sentry...
BODY_ALLOWANCE_BYTES = 64 * 1024  # one more second of header timeout per 64 KB received
# Unsent response bytes held per connection before the app's next write blocks (waitress
# default: 16 MB). A download relayed as it arrives to a client reading slower than the
# upstream sends would otherwise park 16 MB per connection (measured: +24 to +34 MB peak
# RSS serving 200 MB over loopback, against +1 MB at 128 to 512 KB, at the same speed).
# Below waitress's outbuf_overflow (1 MB) the buffer never spills to a temporary file.
OUTBUF_HIGH_WATERMARK = 256 * 1024
MAINTENANCE_SECONDS = 1.0
ACCEPT_BATCH = 128
LOOP_SECONDS = 0.2
_TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "message": "The request took too long to arrive; it was abandoned.",
            "type": "invalid_request_error",
            "code": "request_timeout",
        }
    }
).encode()
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)

# waitress ships no type information: its servers are Any to the type checker
AnyServer: TypeAlias = Any  # BaseWSGIServer | MultiSocketServer


# --- sizing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """How the server is sized for a capacity, and what the open-files limit allows."""

    max_concurrent: int
    threads: int
    connection_limit: int
    open_files: int

    @property
    def connections_allowed(self) -> int:
        """Client connections the open-files limit allows while every slot proxies."""
        return max(0, self.open_files - RESERVED_FILES - self.max_concurrent)

    def describe(self) -> str:
        return (
            f"{self.max_concurrent} requests in flight; {self.threads} threads; "
            f"{self.connection_limit} connections (open files {self.open_files} "
            f"allow {self.connections_allowed})"
        )


def size_for(max_concurrent: int, threads: int | None, open_files: int) -> Sizing:
    """Threads and connection limit for ``max_concurrent`` proxied requests in flight."""
    wanted = max_concurrent + max(max_concurrent, CONNECTION_HEADROOM)
    allowed = max(open_files - RESERVED_FILES - max_concurrent, 16)
    return Sizing(
        max_concurrent=max_concurrent,
        threads=threads or max_concurrent + SPARE_THREADS,
        connection_limit=min(wanted, allowed),
        open_files=open_files,
    )


def with_options(
    settings: Settings, max_concurrent: int | None, admin_port: int | None
) -> Settings:
    """Settings with ``serve``'s --max-concurrent / --admin-port applied (they win)."""
    if max_concurrent is not None:
        settings = replace(settings, max_concurrent=max_concurrent)
    if admin_port is not None:
        settings = replace(settings, admin_port=admin_port)
    return settings


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (each connection is a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %s to %s", soft, target)
    return soft


# --- slow clients ----------------------------------------------------------------------------


def overdue(started: float | None, received: int, now: float, timeout: float) -> bool:
    """Whether a request still arriving since ``started`` has had its time."""
    if started is None:
        return False
    return now - started > timeout + received / BODY_ALLOWANCE_BYTES


class KeepAliveTask(WSGITask):
    """waitress's request task, keeping HTTP/1.1 connections open after a stream.

    waitress closes the connection after every response without Content-Length, which
    is every SSE stream: the client then reconnects for its next request, and the router
    pays an accept and a new connection per stream. Chunked framing already delimits the
    response, so the connection stays open unless the client asked to close it (an error
    mid-stream still closes it: waitress sets ``close_on_finish`` after the header).
    """

    close_on_finish: bool
    wrote_header: bool
    content_bytes_written: int

    def write(self, data: bytes) -> None:
        """waitress's write, made cheap for the common cases: the head goes out with the
        first piece of the body (one send, and one wake-up of the client, fewer per
        response), and each relayed SSE event is framed as a chunk in one step."""
        if data and not self.wrote_header and self.complete:
            head = self.build_response_header()
            self.wrote_header = True
            if self.chunked_response:  # implies has_body
                self.channel.write_soon(head + _chunk(data))
                return
            length = self.content_length
            if self.has_body and length is not None and len(data) <= length:
                self.content_bytes_written += len(data)
                self.channel.write_soon(head + data)
                return
            self.channel.write_soon(head)  # and the body as waitress would
        if self.chunked_response and self.wrote_header and data:
            self.channel.write_soon(_chunk(data))
        else:
            super().write(data)

    def build_response_header(self) -> bytes:
        asked_to_close = self.close_on_finish or (
            self.request.headers.get("CONNECTION", "").lower() == "close"
        )
        header = super().build_response_header()
        if self.chunked_response and self.version == "1.1" and not asked_to_close:
            self.close_on_finish = False
            header = header.replace(b"\r\nConnection: close", b"", 1)
        return header


def _chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk, in one step."""
    return b"%X\r\n%s\r\n" % (len(data), data)


class GuardedChannel(RouterChannel):
    """waitress's connection, timing the request that is still arriving.

    ``request_started`` is None while no request is partly received (idle keep-alive is
    ``channel_timeout``'s business); a new connection's clock starts at accept, because
    a connection that never sends a byte is the cheapest slowloris of all.
    """

    clock: Callable[[], float] = time.monotonic
    task_class = KeepAliveTask
    worker_writing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_started: float | None = self.clock()
        self.request_bytes = 0

    def write_soon(self, data: bytes) -> int:
        """A worker's write, which flushes to the socket itself when it can.

        With nothing queued before it, the bytes go straight to the socket: waitress would
        first copy them into its output buffer and take them out again (a quarter of the
        cost of relaying an SSE event). What the socket does not take, or any error, goes
        the ordinary way below, which queues the rest and deals with the error as waitress
        does.

        While it runs, the main loop must not poll this socket for writability: it would
        see bytes about to be sent by the worker, wake at once, find nothing to do, and
        spin once per relayed event. Bytes the worker could not send (a slow reader) are
        handed to the main loop afterwards, as waitress does.
        """
        sent = 0
        if data.__class__ is bytes and not self.total_outbufs_len and self.connected:
            lock = self.outbuf_lock  # only this worker writes; the main loop may flush
            lock.acquire()
            try:
                if not self.total_outbufs_len and self.connected:
                    sent = self.socket.send(data)
            except OSError:  # would block, or the client left: see below
                sent = 0
            finally:
                lock.release()
            if sent:
                self.last_activity = time.time()
                if sent == len(data):
                    return sent
                data = data[sent:]
        return sent + self._queue(data)

    def _queue(self, data: bytes) -> int:
        self.worker_writing = True
        try:
            return super().write_soon(data)
        finally:
            self.worker_writing = False
            if self.total_outbufs_len:
                self.server.pull_trigger()

    def _flush_outbufs_below_high_watermark(self) -> None:
        """Wait (a worker, in ``write_soon``) until the unsent bytes fall below the
        watermark; the main loop must see the socket as writable meanwhile.

        It is the main loop that drains the buffer and wakes the waiting worker: were
        ``worker_writing`` left set, it would never poll the socket, and a response larger
        than the watermark plus the socket buffers would hang for good.
        """
        writing, self.worker_writing = self.worker_writing, False
        try:
            super()._flush_outbufs_below_high_watermark()
        finally:  # waitress also calls it between pipelined requests, outside write_soon
            self.worker_writing = writing

    def writable(self) -> bool:
        return not self.worker_writing and super().writable()

    def received(self, data: bytes) -> bool:
        pending = self.request
        result = super().received(data)
        if self.request is None:  # everything received so far forms whole requests
            self.request_started = None
        elif self.request is not pending:  # a new request began in this data
            self.request_started, self.request_bytes = self.clock(), len(data)
        else:
            self.request_bytes += len(data)
        return result

    def abandon_slow_request(self) -> None:
        """Answer 408 and close once it is sent (main loop thread, no task running)."""
        self.request_started = None
        with self.outbuf_lock:
            self.outbufs[-1].append(REQUEST_TIMEOUT_RESPONSE)
            self.total_outbufs_len += len(REQUEST_TIMEOUT_RESPONSE)
        self.close_when_flushed = True


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server whose maintenance pass also ends too-slow requests."""

    channel_class = GuardedChannel
    header_timeout = 30.0
    on_slow_request: Callable[[], None] = staticmethod(lambda: None)

    def handle_accept(self) -> None:
        """Accept every waiting connection (up to a batch), not one per loop turn.

        waitress accepts one connection each time the main loop polls, and each poll
        costs time in proportion to the open connections: a burst of a thousand clients
        took a thousand turns, quadratic work that delayed every first byte by seconds.
        """
        for _ in range(ACCEPT_BATCH):
            before = len(self._map)
            if before >= self.adj.connection_limit:
                return
            super().handle_accept()
            if len(self._map) == before:  # nothing was waiting (or accept failed)
                return

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        clock = GuardedChannel.clock()
        for channel in list(self.active_channels.values()):
            if (
                isinstance(channel, GuardedChannel)
                and not channel.requests
                and not channel.close_when_flushed
                and overdue(
                    channel.request_started, channel.request_bytes, clock, self.header_timeout
                )
            ):
                channel.abandon_slow_request()
                self.on_slow_request()


# --- building servers ------------------------------------------------------------------------


class LifoCondition(threading.Condition):
    """A condition whose ``notify`` wakes the most recently parked waiter first.

    ``threading.Condition`` wakes waiters oldest first, so with a thousand idle workers
    every request lands on the coldest thread (stack and interpreter state long evicted
    from the CPU caches): measured 9 % more CPU per plain request at 1,040 threads than at
    48. Waking the newest waiter keeps the same few warm threads busy. Relies on
    CPython's ``_waiters`` deque of per-waiter locks, as ``notify`` itself does.
    """

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters  # type: ignore[attr-defined]
        while waiters and n > 0:
            waiter = waiters.pop()
            try:
                waiter.release()
            except RuntimeError:  # released before, by a notify interrupted by a signal
                continue
            n -= 1


class WarmDispatcher(ThreadedTaskDispatcher):
    """waitress's worker pool, handing each task to the most recently idle thread."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_cv = LifoCondition(self.lock)


def build_server(
    application: Callable[..., Any],
    host: str,
    port: int,
    threads: int,
    connection_limit: int,
    header_timeout: float,
    on_slow_request: Callable[[], None],
    **adjustments: Any,
) -> AnyServer:
    """A waitress server (one per listen address, as ``create_server``) of guarded parts."""
    adj = Adjustments(
        host=host,
        port=port,
        threads=threads,
        connection_limit=connection_limit,
        cleanup_interval=MAINTENANCE_SECONDS,
        ident="apirouter",
        asyncore_use_poll=True,
        clear_untrusted_proxy_headers=True,
        **adjustments,
    )
    dispatcher = WarmDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict[int, Any] = {}
    servers = []
    for sockinfo in adj.listen:
        server = GuardedServer(
            application, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo
        )
        server.header_timeout = header_timeout
        server.on_slow_request = on_slow_request
        servers.append(server)
    if len(servers) == 1:
        return servers[0]
    listen = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listen, dispatcher, servers[0].log_info)


def make_server(app: App, host: str, port: int, threads: int | None = None) -> AnyServer:
    """The app's server, sized for its capacity, plus its admin listener if configured.

    The admin listener (``server.admin``) is bound here too, so a port in use fails
    start-up at once. Its body limit is a backstop above the app's own.
    """
    settings = app.settings
    sizing = size_for(settings.max_concurrent, threads, raise_open_files_limit())
    server = build_server(
        app,
        host,
        port,
        sizing.threads,
        sizing.connection_limit,
        settings.header_timeout,
        lambda: app.metrics.requests_refused.labels("header_timeout").inc(),
        max_request_body_size=body_backstop(settings.max_body_bytes, app.store.current),
        outbuf_high_watermark=OUTBUF_HIGH_WATERMARK,
    )
    server.sizing = sizing
    server.admin = None
    if settings.admin_port is not None:
        from apirouter.admin import AdminListener  # admin builds on this module

        try:
            server.admin = AdminListener(app, host, settings.admin_port)
        except OSError as exc:
            close_server(server)
            raise OSError(exc.errno, f"admin port {settings.admin_port}: {exc.strerror}") from None
    return server


def body_backstop(default_limit: int, config: ProviderConfig) -> int:
    """waitress's own request body limit: above every route's, so the app decides.

    waitress spools a body to a temporary file before the app sees it, and refuses one
    over this limit at once (a declared length, from the headers). Twice the largest route
    limit leaves room for chunked framing (counted by waitress). Fixed at start-up: a
    reloaded config that raises a route's ``maxBodyBytes`` above it needs a restart.
    """
    limits = [default_limit]
    for provider in (config, *config.fallbacks):
        limits += [e.max_body_bytes for e in provider.endpoints.values() if e.max_body_bytes]
    return max(limits) * 2 + 1024 * 1024


def listen_urls(server: AnyServer) -> list[str]:
    listeners = getattr(server, "effective_listen", None) or [
        (server.effective_host, server.effective_port)
    ]
    return [f"http://{f'[{h}]' if ':' in str(h) else h}:{p}" for h, p in listeners]


def banner_lines(server: AnyServer) -> list[str]:
    """What the start-up banner says about capacity and the admin listener."""
    lines = [f"capacity {server.sizing.describe()}"]
    admin = getattr(server, "admin", None)
    if admin is not None:
        lines.append(f"admin    {admin.url}: /health, /health/ready, /metrics")
    return lines


# --- running ---------------------------------------------------------------------------------


def run(
    server: AnyServer,
    app: App,
    on_ready: Callable[[], None] = lambda: None,
    stopping: threading.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``stopping`` is set), then shut down gracefully."""
    stopping = stopping or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: _drain(app, stopping))
    watcher = threading.Thread(target=watch_config, args=(app, stopping), daemon=True)
    watcher.start()
    threading.Thread(target=app.health_checker.run, args=(stopping,), daemon=True).start()
    admin = getattr(server, "admin", None)
    if admin is not None:
        admin.start()
    socket_map = getattr(server, "map", None) or server._map
    on_ready()
    try:
        while not stopping.is_set():
            wasyncore.loop(timeout=LOOP_SECONDS, map=socket_map, use_poll=True, count=1)
        _drain(app, stopping)
        log.info("shutting down: no new connections; waiting for requests in flight")
        _stop_listening(socket_map)
        deadline = time.monotonic() + app.settings.shutdown_grace
        while app.reporter.in_flight > 0 and time.monotonic() < deadline:
            wasyncore.loop(timeout=0.1, map=socket_map, use_poll=True, count=1)
    finally:
        server.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(socket_map)
        app.close()
        tracking.flush()
        if admin is not None:
            admin.stop()  # last: /health/ready said 503 until the very end
        log.info("stopped")


def _drain(app: App, stopping: threading.Event) -> None:
    """From now on /health/ready answers 503; the serve loop then stops accepting."""
    app.capacity.draining.set()
    stopping.set()


def close_server(server: AnyServer) -> None:
    """Close a server that never ran (its threads and sockets)."""
    server.task_dispatcher.shutdown(timeout=1)
    wasyncore.close_all(getattr(server, "map", None) or server._map)


def watch_config(app: App, stopping: threading.Event) -> None:
    while not stopping.wait(CONFIG_POLL_SECONDS):
        try:
            app.store.reload_if_changed()
        except Exception:
            log.exception("config watcher failed")


def _stop_listening(socket_map: dict[int, Any]) -> None:
    for dispatcher in list(socket_map.values()):
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.accepting = False
            dispatcher.del_channel()
            dispatcher.socket.close()
