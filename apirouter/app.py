"""The WSGI application: route table, request parsing, responses, and ``finish``.

Every request ends in exactly one ``finish(ctx, outcome)``, which records the outcome once
for metrics, the access log, Sentry and the failure tracker. Plain responses finish before
they are returned; streamed ones finish when the server closes the relay.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from apirouter import __version__, errors, forward, tracking
from apirouter.alerting import Alert, Failure, FailureTracker, Recovery
from apirouter.capacity import build_gate, readiness
from apirouter.config import (
    HOP_BY_HOP,
    ConfigInvalid,
    ConfigStore,
    Endpoint,
    ProviderConfig,
    RateLimit,
    load,
    log_reload,
    shipped_providers,
)
from apirouter.context import Outcome, RequestContext
from apirouter.keys import ANONYMOUS, anonymize
from apirouter.logs import access_log, alert_log
from apirouter.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from apirouter.metrics import Metrics
from apirouter.ratelimit import RateLimiter
from apirouter.relay import SseRelay
from apirouter.settings import Settings
from apirouter.upstream import Upstream, iter_raw

log = logging.getLogger("apirouter.app")

StartResponse = Callable[..., Any]
JSON = "application/json"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_NOT_RELAYED = HOP_BY_HOP | {"set-cookie", "content-length", "x-request-id"}
_LOCAL_ROUTES = {"/health": "GET", "/health/ready": "GET", "/metrics": "GET", "/v1/models": "GET"}


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    error: errors.RouterError | None = None
    relay: SseRelay | None = field(default=None, repr=False)


def error_response(error: errors.RouterError) -> Response:
    headers = [("Content-Type", JSON), *error.response_headers()]
    return Response(error.status, headers, error.body(), error)


def json_response(document: Any, status: int = 200) -> Response:
    return Response(status, [("Content-Type", JSON)], json.dumps(document).encode())


class App:
    """The router as a WSGI callable. Long-lived parts are built once and shared."""

    def __init__(
        self,
        store: ConfigStore,
        settings: Settings,
        *,
        upstream: Upstream | None = None,
        tracking_enabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.upstream = upstream or Upstream(settings.connect_timeout, settings.read_timeout)
        self.tracking_enabled = tracking_enabled
        self.clock = clock
        self.started = clock()
        self.metrics = Metrics()
        self.limiter = RateLimiter(clock=clock)
        self.tracker = FailureTracker(
            settings.alert_threshold,
            settings.alert_window_seconds,
            settings.alert_throttle_seconds,
            clock=clock,
        )
        self.metrics.track_bucket_count(lambda: len(self.limiter))
        self.capacity = build_gate(settings, self.metrics)  # proxied requests in flight
        store.on_reload = self._config_reloaded
        self._client_keys = tuple(k.encode() for k in settings.client_keys)

    # --- WSGI entry point ------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = self.store.current
        path = environ.get("PATH_INFO") or "/"
        endpoint = config.endpoints.get(path)
        route = path if (endpoint or path in _LOCAL_ROUTES) else "other"
        headers = _client_headers(environ)
        key = forward.client_key(headers)
        ctx = RequestContext(
            request_id=_request_id(headers.get("x-request-id")),
            method=environ.get("REQUEST_METHOD", "GET"),
            route=route,
            provider=config.name,
            key_label=anonymize(key),
            start=self.clock(),
        )
        self.metrics.in_flight.inc()
        try:
            response = self._dispatch(environ, ctx, config, endpoint, headers, key)
        except errors.RouterError as error:
            response = error_response(error)
        except Exception as exc:  # never a traceback to the client; reported once in finish
            error = errors.InternalError(
                f"Internal error while handling the request ({ctx.request_id})."
            )
            error.__cause__ = exc
            response = error_response(error)
        response.headers.append(("X-Request-ID", ctx.request_id))
        write = start_response(_status_line(response.status), response.headers)
        if response.relay is not None:
            return response.relay.relay_to(write)  # heartbeats go out through write
        self._finish(ctx, Outcome(response.status, response.error))
        return [response.body]

    def _dispatch(
        self,
        environ: dict[str, Any],
        ctx: RequestContext,
        config: ProviderConfig,
        endpoint: Endpoint | None,
        headers: dict[str, str],
        key: str | None,
    ) -> Response:
        allowed = endpoint.method if endpoint else _LOCAL_ROUTES.get(ctx.route)
        if allowed is None:
            raise errors.NotFound(
                f"Unknown path {environ.get('PATH_INFO', '/')[:200]!r}: "
                "see the README for the endpoints."
            )
        if ctx.method != allowed:
            raise errors.MethodNotAllowed(
                f"Method {ctx.method} is not allowed here; use {allowed}.", [allowed]
            )
        if endpoint is None:
            return self._local(ctx.route, config)
        return self.capacity.admit(  # 503 over_capacity at once when every slot is taken
            ctx.key_label, lambda: self._proxy(environ, ctx, config, endpoint, headers, key)
        )

    # --- local endpoints -------------------------------------------------------------------

    def _local(self, route: str, config: ProviderConfig) -> Response:
        if route == "/metrics":
            return Response(200, [("Content-Type", METRICS_CONTENT_TYPE)], self.metrics.render())
        if route == "/v1/models":
            return json_response({"object": "list", "data": _models(config)})
        if route == "/health/ready":
            status, document = readiness(self.capacity, config_loaded=config is not None)
            return json_response(document, status)
        return json_response(
            {
                "status": "ok",
                "version": __version__,
                "provider": config.name,
                "upstream": config.base_url,
                "uptime_seconds": round(self.clock() - self.started, 3),
                "sentry_enabled": self.tracking_enabled,
                "rate_limiter": {"buckets": len(self.limiter)},
                "capacity": self.capacity.snapshot(),
            }
        )

    # --- the proxy -------------------------------------------------------------------------

    def _proxy(
        self,
        environ: dict[str, Any],
        ctx: RequestContext,
        config: ProviderConfig,
        endpoint: Endpoint,
        headers: dict[str, str],
        key: str | None,
    ) -> Response:
        upstream_key = self._authorize(key)
        self._rate_limit(ctx, config, endpoint)
        body = self._read_body(environ, headers, endpoint, config)
        if body.stream and not endpoint.stream_support:
            raise errors.BadRequest(f"Streaming is not supported on {endpoint.local_path}.")
        url = forward.upstream_url(config, endpoint, environ.get("QUERY_STRING", ""))
        ctx.upstream_url = url.partition("?")[0]
        ctx.upstream_host = config.upstream_host
        outgoing = forward.upstream_headers(headers, config, endpoint, upstream_key, ctx.request_id)
        sent_at = self.clock()
        upstream_response = self.upstream.send(endpoint.method, url, outgoing, body.data)
        ctx.upstream_seconds = self.clock() - sent_at
        ctx.upstream_status = status = upstream_response.status_code
        error = None
        if status >= 500:
            error = errors.UpstreamServerError(
                f"The upstream {ctx.upstream_host} answered HTTP {status}.", status
            )
        relayed = _relayed_headers(upstream_response.headers.raw)
        stream_config = endpoint.stream_config or config.stream_config
        content_type = upstream_response.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            relay = SseRelay(
                upstream_response,
                stream_config.heartbeat_interval_secs,
                on_close=lambda relay_error: self._finish(
                    ctx, Outcome(status, relay_error or error)
                ),
            )
            return Response(status, relayed, error=error, relay=relay)
        try:
            data = b"".join(iter_raw(upstream_response))
        finally:
            upstream_response.close()
        relayed.append(("Content-Length", str(len(data))))
        return Response(status, relayed, data, error)

    def _authorize(self, key: str | None) -> str | None:
        """Check the inbound key if client keys are configured; return the upstream key.

        Without APIROUTER_CLIENT_KEYS the client's own key is forwarded (pass-through);
        with them, the client's key only admits it and the operator's key goes upstream.
        """
        if not self._client_keys:
            return key or self.settings.default_api_key
        presented = (key or "").encode()
        if not any(hmac.compare_digest(presented, allowed) for allowed in self._client_keys):
            raise errors.Unauthorized(
                "Missing or invalid API key: send Authorization: Bearer <key>."
            )
        return self.settings.default_api_key

    def _rate_limit(self, ctx: RequestContext, config: ProviderConfig, endpoint: Endpoint) -> None:
        limit = endpoint.rate_limit or config.rate_limit
        if limit is None and self.settings.rate_limit_rpm > 0:
            limit = RateLimit(self.settings.rate_limit_rpm, self.settings.rate_limit_burst)
        if limit is None:
            return
        wait = self.limiter.acquire((ctx.route, ctx.key_label), limit)
        if wait is not None:
            who = "anonymous clients" if ctx.key_label == ANONYMOUS else "this API key"
            raise errors.RateLimited(
                f"Rate limit of {limit.requests_per_minute} requests/minute (burst {limit.burst}) "
                f"exceeded for {who} on {ctx.route}; retry in {wait}s.",
                wait,
            )

    def _read_body(
        self,
        environ: dict[str, Any],
        headers: dict[str, str],
        endpoint: Endpoint,
        config: ProviderConfig,
    ) -> forward.Body:
        if endpoint.method in ("GET", "DELETE"):
            return forward.Body(b"", None, False)
        content_type = headers.get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        if endpoint.requires_multipart:
            if media_type != "multipart/form-data":
                raise errors.UnsupportedMediaType(
                    f"{endpoint.local_path} expects Content-Type multipart/form-data, "
                    f"got {media_type or 'none'}."
                )
            return forward.multipart_body(self._read(environ), content_type, config.model_mapping)
        if media_type != JSON and not media_type.endswith("+json"):
            raise errors.UnsupportedMediaType(
                f"{endpoint.local_path} expects Content-Type application/json, "
                f"got {media_type or 'none'}."
            )
        return forward.json_body(self._read(environ), config.model_mapping)

    def _read(self, environ: dict[str, Any]) -> bytes:
        """Read the body, refusing an oversized one before reading it."""
        limit = self.settings.max_body_bytes
        declared = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if not declared:
            data = stream.read(limit + 1) if environ.get("wsgi.input_terminated") else b""
        elif not declared.isdigit():
            raise errors.BadRequest(f"Invalid Content-Length header {declared[:32]!r}.")
        elif int(declared) > limit:
            raise errors.PayloadTooLarge(
                f"Request body of {declared} bytes exceeds the limit of {limit} bytes."
            )
        else:
            data = stream.read(int(declared))
        if len(data) > limit:
            raise errors.PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        return data

    # --- finish: the one place an outcome is recorded ---------------------------------------

    def _finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        try:
            self._record(ctx, outcome)
        except Exception:  # reporting must never break serving
            log.exception("failed to record the outcome of request %s", ctx.request_id)

    def _record(self, ctx: RequestContext, outcome: Outcome) -> None:
        elapsed = self.clock() - ctx.start
        error = outcome.error
        metrics = self.metrics
        metrics.in_flight.dec()
        metrics.requests.labels(
            ctx.route, metrics.method_label(ctx.method), str(outcome.status)
        ).inc()
        metrics.request_duration.labels(ctx.route).observe(elapsed)
        if ctx.upstream_seconds is not None:
            metrics.upstream_duration.labels(ctx.provider).observe(ctx.upstream_seconds)
        reported = False
        if error is not None:
            if error.upstream_failure:
                metrics.upstream_errors.labels(ctx.provider, error.error_type).inc()
            elif isinstance(error, errors.ClientDisconnected):
                metrics.client_disconnects.labels(ctx.route).inc()
            if self.tracking_enabled and self._reportable(error):
                tracking.capture_failure(ctx, error, outcome.status)
                reported = True
        self._log_access(ctx, outcome, elapsed, reported)
        if error is not None and error.upstream_failure:
            failure = Failure(error.error_type, outcome.status, ctx.request_id)
            alert = self.tracker.record_failure(ctx.provider, failure)
            if alert is not None:
                self._emit(alert)
        elif ctx.upstream_status is not None:
            recovery = self.tracker.record_success(ctx.provider)
            if recovery is not None:
                self._emit(recovery)

    def _reportable(self, error: errors.RouterError) -> bool:
        if isinstance(error, errors.ClientError):
            return self.settings.sentry_client_errors
        return error.reported

    def _log_access(
        self, ctx: RequestContext, outcome: Outcome, elapsed: float, reported: bool
    ) -> None:
        error = outcome.error
        level = logging.INFO
        if error is not None and error.reported:
            level = logging.ERROR
        elif error is not None and not isinstance(error, errors.ClientDisconnected):
            level = logging.WARNING
        fields = {
            "request_id": ctx.request_id,
            "method": ctx.method,
            "route": ctx.route,
            "status": outcome.status,
            "latency_ms": round(elapsed * 1000, 1),
            "provider": ctx.provider,
            "upstream_ms": None
            if ctx.upstream_seconds is None
            else round(ctx.upstream_seconds * 1000, 1),
            "client_key": ctx.key_label,
            "error_type": error.error_type if error else None,
        }
        message = error.message if error is not None else "request"
        extra = {"fields": fields, **(tracking.REPORTED if reported else {})}
        access_log.log(
            level,
            message,
            extra=extra,
            exc_info=error.__cause__ if isinstance(error, errors.InternalError) else None,
        )

    def _emit(self, event: Alert | Recovery) -> None:
        """An alert goes out three ways, once each: log line, metric, Sentry event."""
        self.metrics.alerts.labels(event.provider, event.alert_type).inc()
        reported = {}
        if self.tracking_enabled:
            capture = (
                tracking.capture_alert if isinstance(event, Alert) else tracking.capture_recovery
            )
            capture(event)  # type: ignore[arg-type]
            reported = tracking.REPORTED
        if isinstance(event, Alert):
            alert_log.error(
                "repeated upstream failures",
                extra={
                    "fields": {
                        "alert_type": event.alert_type,
                        "provider": event.provider,
                        "count": event.count,
                        "window_seconds": event.window_seconds,
                        "threshold": event.threshold,
                        "last_error_type": event.last_error_type,
                        "last_status": event.last_status,
                        "sample_request_ids": ",".join(event.sample_request_ids),
                    },
                    **reported,
                },
            )
        else:
            alert_log.warning(
                "upstream recovered",
                extra={
                    "fields": {
                        "alert_type": event.alert_type,
                        "provider": event.provider,
                        "failures_since_alert": event.failures_since_alert,
                    }
                },
            )

    def _config_reloaded(self, problem: ConfigInvalid | None) -> None:
        self.metrics.config_reloads.labels("failure" if problem else "success").inc()
        reported = False
        if problem is not None and self.tracking_enabled:
            reported = tracking.capture_config_error(problem, self.store.current.name) is not None
        log_reload(problem, extra=tracking.REPORTED if reported else None)

    def close(self) -> None:
        self.upstream.close()


# --- helpers ---------------------------------------------------------------------------------


def _client_headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    return headers


def _request_id(supplied: str | None) -> str:
    if supplied and _SANE_REQUEST_ID.match(supplied):
        return supplied
    return uuid.uuid4().hex


def _relayed_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    relayed = []
    for name, value in raw:
        lowered = name.decode("latin-1").lower()
        if lowered == "x-request-id":
            relayed.append(("X-Upstream-Request-ID", value.decode("latin-1")))
        elif lowered not in _NOT_RELAYED:
            relayed.append((name.decode("latin-1"), value.decode("latin-1")))
    return relayed


def _models(config: ProviderConfig) -> list[dict[str, Any]]:
    return [
        {"id": alias, "object": "model", "created": 0, "owned_by": config.name, "target": target}
        for alias, target in config.model_mapping.items()
    ]


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Unknown')}"


def build(settings: Settings, target: str | None, *, tracking_enabled: bool = False) -> App:
    """Load the provider (name, path, else ``API_ROUTER_CONFIG_PATH``) and build the app."""
    target = target or settings.config_path
    config = load(target)
    path = Path(target) if target and target not in shipped_providers() else None
    return App(ConfigStore(config, path), settings, tracking_enabled=tracking_enabled)
