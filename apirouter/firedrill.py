"""What ``apirouter test-alert`` does: a fire drill for the Sentry pipeline.

1. DSN check: send one event and report the server's own answer (accepted with an id,
   key/project rejected, rate limited, other status, or the network error).
2. Synthetic upstream failures through the *real* app: a failing upstream on loopback
   (refusing connections, or answering 503), a provider labelled ``<name>-test-alert``, and
   the configured alert policy, so the real failure tracker raises the real alert.
3. Delivery confirmation: every event is sent synchronously by a recording transport, so
   the report says for each one whether Sentry accepted it.

Its state lives in this process only: a running router is never touched, and no real API
key is sent anywhere (the synthetic requests carry a fixed fake key).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport
from sentry_sdk.utils import Dsn

from apirouter import tracking
from apirouter.alerting import REPEATED_FAILURES
from apirouter.app import App
from apirouter.config import ProviderConfig, parse
from apirouter.settings import Settings

SYNTHETIC_KEY = "test-alert-synthetic-key"
DRY_RUN_DSN = "http://dry-run@127.0.0.1:9/0"
MODES = ("refuse", "503")


@dataclass
class Delivery:
    """One event and what the Sentry server said about it."""

    kind: str  # dsn-check | error | alert
    event_id: str
    level: str
    tags: dict[str, str]
    accepted: bool = False
    status: int | None = None
    answer: str = ""  # the server's answer in words, or what would be sent (dry run)
    retry_after: str | None = None


@dataclass
class DrillReport:
    dsn: str  # masked
    project_id: str
    provider: str
    mode: str
    failures: int
    threshold: int
    dry_run: bool
    deliveries: list[Delivery] = field(default_factory=list)
    search: str = ""
    link: str | None = None

    @property
    def alert(self) -> Delivery | None:
        return next((d for d in self.deliveries if d.kind == "alert"), None)

    @property
    def dsn_check(self) -> Delivery | None:
        return next((d for d in self.deliveries if d.kind == "dsn-check"), None)

    @property
    def ok(self) -> bool:
        """The alert was raised and (unless this is a dry run) every event was accepted."""
        if self.dry_run:
            return self.alert is not None
        return self.alert is not None and all(d.accepted for d in self.deliveries)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["ok"] = self.ok
        return document


class RecordingTransport(Transport):
    """Sends each envelope synchronously (or not at all, for a dry run) and records the
    server's answer, which the SDK's own background transport never reports."""

    def __init__(self, dsn: str, timeout: float, send: bool) -> None:
        super().__init__({"dsn": dsn})
        self.deliveries: list[Delivery] = []
        self._send = send
        self._timeout = timeout
        self._auth = Dsn(dsn).to_auth(client=f"apirouter-test-alert/{sentry_sdk.VERSION}")

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is None:
            return  # client reports, sessions: not what the drill is about
        tags = dict(event.get("tags") or {})
        kind = "alert" if tags.get("alert_type") == REPEATED_FAILURES else "error"
        if tags.get("test_alert") == "dsn-check":
            kind = "dsn-check"
        delivery = Delivery(kind, event["event_id"], event.get("level", "error"), tags)
        if self._send:
            self._post(envelope, delivery)
        else:
            delivery.answer = f"would send: {_summary(event)}"
        self.deliveries.append(delivery)

    def _post(self, envelope: Envelope, delivery: Delivery) -> None:
        try:
            response = httpx.post(
                self._auth.get_api_url(),
                content=envelope.serialize(),
                headers={
                    "X-Sentry-Auth": self._auth.to_header(),
                    "Content-Type": "application/x-sentry-envelope",
                },
                timeout=self._timeout,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            delivery.answer = _network_reason(exc, self._auth.host)
            return
        delivery.status = response.status_code
        delivery.retry_after = response.headers.get("Retry-After")
        delivery.accepted = response.status_code == 200
        delivery.answer = _status_reason(response, delivery.event_id)

    def flush(self, timeout: float, callback: Any = None) -> None:
        return None


def _summary(event: dict[str, Any]) -> str:
    tags = event.get("tags") or {}
    keys = ("alert_type", "provider", "error_type", "status_code", "synthetic")
    return " ".join(f"{k}={tags[k]}" for k in keys if k in tags)


def _network_reason(exc: httpx.HTTPError, host: str) -> str:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, socket.gaierror):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, socket.gaierror):
        return f"network error: the Sentry host {host} could not be resolved (DNS)"
    if isinstance(exc, httpx.TimeoutException):
        return f"network error: no answer from {host} in time (firewall or proxy?)"
    if isinstance(exc, httpx.ConnectError):
        return f"network error: could not connect to {host}: {exc}"
    return f"network error talking to {host}: {type(exc).__name__}: {exc}"


def _status_reason(response: httpx.Response, event_id: str) -> str:
    status = response.status_code
    if status == 200:
        return f"accepted (event id {event_id})"
    if status in (401, 403):
        return (
            f"rejected (HTTP {status}): the server refused the DSN's key or project; copy "
            "the DSN again from Project Settings > Client Keys"
        )
    if status == 429:
        wait = response.headers.get("Retry-After") or "unknown"
        return f"rate limited by Sentry (HTTP 429): retry after {wait}s; check the project's quotas"
    return f"not accepted (HTTP {status}): {response.text[:200].strip()}"


@contextmanager
def failing_upstream(mode: str) -> Iterator[str]:
    """A loopback upstream that refuses connections, or answers every request with 503."""
    if mode == "refuse":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"  # bound then closed: connections are refused
        return

    class Unavailable(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"error": {"message": "synthetic outage (apirouter test-alert)"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def synthetic_config(provider: str, base_url: str) -> ProviderConfig:
    """The shipped defaults (every route), pointed at the failing upstream."""
    return parse(json.dumps({"name": provider, "baseUrl": base_url}), source="test-alert")


def run(
    settings: Settings,
    dsn: str | None,
    provider: str,
    failures: int,
    mode: str,
    timeout: float,
    dry_run: bool,
    progress: Callable[[], None] = lambda: None,
) -> DrillReport:
    """Run the drill. The SDK is initialised here and shut down before returning."""
    target = dsn or DRY_RUN_DSN
    parsed = Dsn(target)
    label = f"{provider}-test-alert"
    report = DrillReport(
        dsn=tracking.masked_dsn(dsn) if dsn else "none",
        project_id=parsed.project_id,
        provider=label,
        mode=mode,
        failures=failures,
        threshold=settings.alert_threshold,
        dry_run=dry_run,
        search=f"alert_type:{REPEATED_FAILURES} provider:{label}",
        link=_issues_link(parsed, f"alert_type:{REPEATED_FAILURES} provider:{label}"),
    )
    transport = RecordingTransport(target, timeout, send=not dry_run)
    drill_settings = replace(
        settings,
        sentry_dsn=target,
        default_api_key=None,
        client_keys=(),
        # fleet mode: the drill's window and throttle are shared (one alert, decided in
        # Redis) but its own, so an earlier drill's throttle cannot swallow this alert
        redis_prefix=f"{settings.redis_prefix}drill-{secrets.token_hex(4)}:",
    )
    quiet = _quiet_logs()
    tracking.init(drill_settings, transport=transport)
    try:
        sentry_sdk.get_global_scope().set_tag("synthetic", "true")  # this process only
        _dsn_check(label)
        if dry_run or transport.deliveries[0].accepted:
            _fire(drill_settings, label, failures, mode, progress)
    finally:
        tracking.shutdown()
        sentry_sdk.get_global_scope().remove_tag("synthetic")
        quiet()
    report.deliveries = transport.deliveries
    return report


def _dsn_check(provider: str) -> None:
    with sentry_sdk.isolation_scope() as scope:
        scope.set_tags({"test_alert": "dsn-check", "provider": provider})
        sentry_sdk.capture_event(
            {
                "level": "info",
                "logger": "apirouter.test_alert",
                "message": "apirouter test-alert: DSN check",
            }
        )


def _fire(
    settings: Settings, provider: str, failures: int, mode: str, progress: Callable[[], None]
) -> None:
    with failing_upstream(mode) as base_url:
        app = App(synthetic_config(provider, base_url), settings, tracking_enabled=True)
        client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://router")
        try:
            for _ in range(failures):
                client.post(
                    "/v1/chat/completions",
                    json={"model": "test-alert", "messages": []},
                    headers={"Authorization": f"Bearer {SYNTHETIC_KEY}"},
                )
                progress()
        finally:
            client.close()
            app.close()


def _quiet_logs() -> Callable[[], None]:
    """Keep the app's access log lines off the operator's terminal during the drill."""
    logger = logging.getLogger("apirouter")
    saved = (list(logger.handlers), logger.propagate)
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False

    def restore() -> None:
        logger.handlers[:], logger.propagate = saved

    return restore


def _issues_link(dsn: Dsn, query: str) -> str | None:
    if not (dsn.host == "sentry.io" or dsn.host.endswith(".sentry.io")):
        return None
    return f"https://sentry.io/issues/?project={dsn.project_id}&query={quote(query)}"
