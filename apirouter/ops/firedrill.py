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

``drill`` is the whole command behind the CLI: it resolves the options against the
environment (raising ``UsageError`` for anything the operator must fix) and runs the drill,
telling an observer about each step so a terminal can show what is happening now.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport
from sentry_sdk.utils import Dsn

from apirouter.config.provider import PROVIDER_NAME, ConfigInvalid, ProviderConfig, load, parse
from apirouter.config.settings import Settings, SettingsError
from apirouter.observe import tracking
from apirouter.observe.delivery import state_for
from apirouter.ops.diagnostics import UsageError
from apirouter.proxy.app import App
from apirouter.state.alerting import RECOVERED, REPEATED_FAILURES
from apirouter.state.breakers import State

SYNTHETIC_KEY = "test-alert-synthetic-key"
DRY_RUN_DSN = "http://dry-run@127.0.0.1:9/0"
MODES = ("refuse", "503")
LABEL_SUFFIX = "-test-alert"


@dataclass(frozen=True)
class DrillOptions:
    """What the operator asked for; ``None`` means "from the environment"."""

    dsn: str | None = None  # default: SENTRY_DSN
    provider: str | None = None  # default: the configured provider's name
    failures: int | None = None  # default: the alert threshold
    mode: str = "refuse"
    timeout: float = 10.0
    dry_run: bool = False


class DrillObserver(Protocol):
    """Told about each step as it starts, so a terminal shows the step actually running."""

    def checking_dsn(self) -> None: ...

    def firing(self, total: int) -> None: ...

    def fired(self) -> None: ...


class QuietObserver:
    """Shows nothing (JSON output, tests, no terminal)."""

    def checking_dsn(self) -> None:
        return None

    def firing(self, total: int) -> None:
        return None

    def fired(self) -> None:
        return None


@dataclass
class Delivery:
    """One event and what the Sentry server said about it."""

    kind: str  # dsn-check | error | alert | recovery
    event_id: str
    level: str
    tags: dict[str, str]
    accepted: bool = False
    status: int | None = None
    answer: str = ""  # the server's answer in words, or what would be sent (dry run)
    retry_after: str | None = None
    state: str = ""  # the same word /health uses (ok, rejected, rate_limited, unreachable)


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
    # after the alert: the upstream was cooled down and the fallback served the next
    # request (its X-Apirouter-Upstream), then one probe closed the breaker
    cooldown_served_by: str | None = None
    probe_served_by: str | None = None

    @property
    def alert(self) -> Delivery | None:
        return next((d for d in self.deliveries if d.kind == "alert"), None)

    @property
    def recovery(self) -> Delivery | None:
        return next((d for d in self.deliveries if d.kind == "recovery"), None)

    @property
    def dsn_check(self) -> Delivery | None:
        return next((d for d in self.deliveries if d.kind == "dsn-check"), None)

    @property
    def ok(self) -> bool:
        """The alert and the recovery were raised and (unless this is a dry run) every
        event was accepted."""
        raised = self.alert is not None and self.recovery is not None
        if self.dry_run:
            return raised
        return raised and all(d.accepted for d in self.deliveries)

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
        tags: dict[str, str] = dict(event.get("tags") or {})
        kind = {REPEATED_FAILURES: "alert", RECOVERED: "recovery"}.get(
            tags.get("alert_type", ""), "error"
        )
        if tags.get("test_alert") == "dsn-check":
            kind = "dsn-check"
        delivery = Delivery(kind, event["event_id"], event.get("level", "error"), tags)
        if self._send:
            self._post(envelope, delivery)
        else:
            delivery.answer = f"would send: {_summary(tags)}"
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
            delivery.state = state_for(None)
            return
        delivery.status = response.status_code
        delivery.state = state_for(response.status_code)
        delivery.retry_after = response.headers.get("Retry-After")
        delivery.accepted = response.status_code == 200
        delivery.answer = _status_reason(response, delivery.event_id)

    def flush(self, timeout: float, callback: Any = None) -> None:
        return None


def _summary(tags: Mapping[str, str]) -> str:
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


def refused_base_url() -> str:
    """A loopback base URL where connections are refused: a port bound, then closed.

    The one copy of this trick; the tests use it too. Another process could take the port
    in between, which is unlikely enough for a drill and for tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


OUTAGE = b'{"error": {"message": "synthetic outage (apirouter test-alert)"}}'
ANSWER = b'{"id": "test-alert", "object": "chat.completion", "choices": []}'


@contextmanager
def _local_upstream(port: int, healthy: Callable[[], bool]) -> Iterator[str]:
    """A loopback upstream answering 200 while ``healthy()``, else 503."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ok = healthy()
            body = ANSWER if ok else OUTAGE
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def failing_upstream(mode: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A loopback upstream that refuses connections, or answers every request with 503,
    and the function that heals it (answers 200 from then on)."""
    with ExitStack() as stack:
        if mode == "refuse":
            base_url = refused_base_url()
            port = int(base_url.rsplit(":", 1)[1].split("/")[0])

            def listen_there() -> None:  # the refused port starts answering 200
                stack.enter_context(_local_upstream(port, lambda: True))

            yield base_url, listen_there
            return
        state = {"healthy": False}
        base_url = stack.enter_context(_local_upstream(0, lambda: state["healthy"]))
        yield base_url, functools.partial(state.__setitem__, "healthy", True)


def synthetic_config(
    provider: str, base_url: str, standby_url: str | None = None
) -> ProviderConfig:
    """The shipped defaults (every route), pointed at the failing upstream, with a local
    standby as its fallback provider (so the drill can show a cooldown)."""
    # One synthetic request is one failure: no retries, so the alert comes after exactly
    # the threshold's worth of requests, as the report says.
    document = {"name": provider, "baseUrl": base_url, "retry": {"maxAttempts": 1}}
    config = parse(json.dumps(document), source="test-alert")
    if standby_url is None:
        return config
    standby = {"name": f"{provider}-standby", "baseUrl": standby_url}
    return replace(config, fallbacks=(parse(json.dumps(standby), source="test-alert"),))


def drill(
    env: Mapping[str, str], options: DrillOptions, observer: DrillObserver | None = None
) -> DrillReport:
    """Everything ``apirouter test-alert`` does, from the environment to the report.

    Raises SettingsError for invalid environment variables and UsageError for options the
    operator must fix (bad --mode, --dsn or --provider, no DSN at all), before anything is sent.
    """
    settings = Settings.from_env(env)
    if options.mode not in MODES:
        raise UsageError(f"--mode must be one of: {', '.join(MODES)}")
    if options.dsn is not None:
        settings = _with_dsn(env, options.dsn)
    if not settings.sentry_dsn and not options.dry_run:
        raise UsageError("no DSN: pass --dsn or set SENTRY_DSN (or use --dry-run)")
    provider = options.provider or configured_provider(settings)
    if not PROVIDER_NAME.match(provider + LABEL_SUFFIX):
        raise UsageError(
            "--provider must be lowercase letters, digits, '.', '_' or '-' "
            f"(at most {63 - len(LABEL_SUFFIX)} characters)"
        )
    return run(
        settings,
        dsn=settings.sentry_dsn,
        provider=provider,
        failures=options.failures or settings.alert_threshold,
        mode=options.mode,
        timeout=options.timeout,
        dry_run=options.dry_run,
        observer=observer or QuietObserver(),
    )


def _with_dsn(env: Mapping[str, str], dsn: str) -> Settings:
    try:
        return Settings.from_env({**env, "SENTRY_DSN": dsn})
    except SettingsError as exc:
        raise UsageError(f"--dsn: {dict(exc.problems).get('SENTRY_DSN', exc)}") from None


def configured_provider(settings: Settings) -> str:
    """The provider name serve would use, as the drill's label; "apirouter" if unloadable."""
    try:
        return load(settings.config_path).name
    except ConfigInvalid:
        return "apirouter"


def run(
    settings: Settings,
    *,
    dsn: str | None,
    provider: str,
    failures: int,
    mode: str,
    timeout: float,
    dry_run: bool,
    observer: DrillObserver | None = None,
) -> DrillReport:
    """Run the drill. The SDK is initialised here and shut down before returning."""
    observer = observer or QuietObserver()
    target = dsn or DRY_RUN_DSN
    parsed = Dsn(target)
    label = f"{provider}{LABEL_SUFFIX}"
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
        observer.checking_dsn()
        _dsn_check(label)
        if dry_run or transport.deliveries[0].accepted:
            observer.firing(failures)
            _fire(
                drill_settings,
                label,
                report,
                failures=failures,
                mode=mode,
                fired=observer.fired,
            )
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
    settings: Settings,
    provider: str,
    report: DrillReport,
    *,
    failures: int,
    mode: str,
    fired: Callable[[], None],
) -> None:
    """The synthetic failures, then what the router does about them: the failing upstream
    is cooled down (the standby fallback serves), and once it is healed and its cooldown
    is over (on the drill's own clock, so nothing waits), one probe closes the breaker
    and raises the recovery notice."""
    now = [time.monotonic()]
    with (
        failing_upstream(mode) as (base_url, heal),
        _local_upstream(0, lambda: True) as standby_url,
    ):
        config = synthetic_config(provider, base_url, standby_url)
        app = App(config, settings, tracking_enabled=True, clock=lambda: now[0])
        client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://router")
        try:
            for _ in range(failures):
                _synthetic_request(client)
                fired()
            key = f"{config.name}/{config.upstreams[0].name}"
            breakers = app.reporter.breakers
            # refused connections cool the upstream; its 503s cool the drill's model there
            if breakers.state(key) is not State.COOLING and not breakers.scoped(key)[1]:
                return  # no alert, no cooldown: nothing more to show
            report.cooldown_served_by = _synthetic_request(client)
            heal()
            now[0] += config.cooldown.max_secs + 1
            report.probe_served_by = _synthetic_request(client)
        finally:
            client.close()
            app.close()


def _synthetic_request(client: httpx.Client) -> str | None:
    """One chat request through the real app; who served it (X-Apirouter-Upstream)."""
    response = client.post(
        "/v1/chat/completions",
        json={"model": "test-alert", "messages": []},
        headers={"Authorization": f"Bearer {SYNTHETIC_KEY}"},
    )
    served_by: str | None = response.headers.get("X-Apirouter-Upstream")
    return served_by


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
