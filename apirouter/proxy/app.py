"""The WSGI application: the route table, the proxy's steps, and the responses.

Every request ends in exactly one ``Reporter.finish(ctx, outcome)``. Plain responses
finish before they are returned; streamed ones finish when the server closes the relay.
"""

from __future__ import annotations

import functools
import hmac
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from apirouter import __version__, errors
from apirouter.config import routes
from apirouter.config.headers import relayed_response_headers
from apirouter.config.provider import (
    ConfigStore,
    Endpoint,
    ProviderConfig,
    RateLimit,
    load,
    shipped_providers,
)
from apirouter.config.settings import Settings
from apirouter.observe import traces
from apirouter.observe.context import Outcome, RequestContext
from apirouter.observe.keys import ANONYMOUS, anonymize
from apirouter.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from apirouter.observe.report import Reporter
from apirouter.observe.usage import USAGE_ROUTES, UsageReader
from apirouter.proxy import inbound
from apirouter.proxy.attempts import Attempts, Sent
from apirouter.proxy.capacity import build_gate, readiness
from apirouter.proxy.inbound import JSON, Inbound
from apirouter.proxy.probes import HealthChecker
from apirouter.proxy.relay import Relay
from apirouter.upstream.client import Upstream, iter_raw

StartResponse = Callable[..., Any]
_LOCAL_ROUTES = frozenset(("/health", "/health/ready", "/metrics"))
_LOCAL_METHODS = ("GET", "HEAD")
_MODELS = "/v1/models"
_REALTIME = "/v1/realtime"
SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]  # no proxy buffering
MAX_URL_BYTES = 16 * 1024  # longer request targets get 414, as nginx's large buffers do


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    error: errors.RouterError | None = None
    relay: Relay | None = field(default=None, repr=False)


def error_response(error: errors.RouterError) -> Response:
    headers = [("Content-Type", JSON), *error.response_headers()]
    return Response(error.status, headers, error.body(), error)


def json_response(document: Any, status: int = 200) -> Response:
    return Response(status, [("Content-Type", JSON)], json.dumps(document).encode())


class App:
    """The router as a WSGI callable. Long-lived parts are built once and shared."""

    def __init__(
        self,
        config: ProviderConfig,
        settings: Settings,
        *,
        config_path: Path | None = None,
        upstream: Upstream | None = None,
        tracking_enabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.started = clock()
        self.reporter = Reporter(settings, tracking_enabled=tracking_enabled, clock=clock)
        self.tracer = traces.tracer(settings, tracking_enabled)  # None: tracing is off
        self.store = ConfigStore(config, config_path, on_reload=self.reporter.config_reloaded)
        self.upstream = upstream or Upstream(settings.connect_timeout, settings.read_timeout)
        self.limiter = self.reporter.state.limiter  # in-process, or Redis in fleet mode
        self.metrics = self.reporter.metrics
        self.attempts = Attempts(
            self.upstream, self.reporter.breakers, self.reporter, settings.environment, clock
        )
        self.reporter.watch_upstreams(config)
        self.health_checker = HealthChecker(
            lambda: self.store.current, self.upstream, self.reporter, settings.environment, clock
        )
        self.metrics.track_bucket_count(lambda: len(self.limiter))
        self.capacity = build_gate(settings, self.metrics)  # proxied requests in flight
        self._client_keys = tuple(k.encode() for k in settings.client_keys)

    # --- WSGI entry point ------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = self.store.current
        path = environ.get("PATH_INFO") or "/"
        match = None if path in _LOCAL_ROUTES else config.routes.match(routes.raw_path(environ))
        route = match.endpoint.local_path if match else path
        request = inbound.parse(
            environ, route=route if (match or path in _LOCAL_ROUTES) else "other"
        )
        ctx = RequestContext(
            request_id=request.request_id,
            method=request.method,
            route=request.route,
            provider=config.name,
            key_label=anonymize(request.key),
            start=self.clock(),
        )
        self.reporter.begin()
        if self.tracer is not None and match is not None:  # proxied requests only
            ctx.trace = self.tracer.begin(ctx)
        try:
            response = self._dispatch(request, ctx, config, match)
        except errors.RouterError as error:
            response = error_response(error)
        except Exception as exc:  # never a traceback to the client; reported once in finish
            internal = errors.InternalError(
                f"Internal error while handling the request ({ctx.request_id})."
            )
            internal.__cause__ = exc
            response = error_response(internal)
        response.headers.append(("X-Request-ID", ctx.request_id))
        if request.method == "HEAD":  # RFC 9110 §9.3.2: the GET headers, never a body
            response.headers.append(("Content-Length", str(len(response.body))))
        write = start_response(_status_line(response.status), response.headers)
        if response.relay is not None:
            return response.relay.relay_to(write)  # heartbeats go out through write
        self.reporter.finish(ctx, Outcome(response.status, response.error))
        return [] if request.method == "HEAD" else [response.body]

    def _dispatch(
        self,
        request: Inbound,
        ctx: RequestContext,
        config: ProviderConfig,
        match: routes.Match[Endpoint] | None,
    ) -> Response:
        if len(request.path) + len(request.query) > MAX_URL_BYTES:
            raise errors.URITooLong(f"The request target exceeds {MAX_URL_BYTES} bytes.")
        if match is None and request.route == "other":
            raise _not_found(request.path)
        allowed = match.endpoint.methods if match else _LOCAL_METHODS
        if request.method not in allowed:
            raise errors.MethodNotAllowed(
                f"Method {request.method} is not allowed here; use {' or '.join(allowed)}.",
                list(allowed),
            )
        if match is None:
            return self._local(request.route)
        routes.check_segments(match.params)
        alias = match.params.get("model")
        if request.route == _MODELS + "/{model}" and unquote(alias or "") in config.model_mapping:
            self._authorize(request.key)  # the same key /v1/models asks for
            return json_response(_model(unquote(alias or ""), config))
        # every proxied request takes a slot: 503 over_capacity at once when none is free
        if request.route == _MODELS:
            return self.capacity.admit(
                ctx.key_label, lambda: self._models(request, ctx, config, match.endpoint)
            )
        return self.capacity.admit(ctx.key_label, lambda: self._proxy(request, ctx, config, match))

    # --- local endpoints -------------------------------------------------------------------

    def _local(self, route: str) -> Response:
        if route == "/metrics":
            return Response(200, [("Content-Type", METRICS_CONTENT_TYPE)], self.metrics.render())
        if route == "/health/ready":
            status, document = readiness(self.capacity, config_loaded=True)
            return json_response(document, status)
        return json_response(self._health(self.store.current))

    def _models(
        self, request: Inbound, ctx: RequestContext, config: ProviderConfig, endpoint: Endpoint
    ) -> Response:
        """The config's aliases first, then the upstream's own list (fetched with the
        client's key). When the upstream cannot answer, the aliases alone."""
        aliases = [_model(alias, config) for alias in config.model_mapping]
        try:
            sent = self._forward(request, ctx, config, routes.Match(endpoint, {}))
            upstream_response = sent.response
            try:
                listed = json.loads(b"".join(iter_raw(upstream_response)))
            finally:
                upstream_response.close()
            theirs = listed["data"] if upstream_response.status_code == 200 else []
            if not isinstance(theirs, list):
                theirs = []
        except (errors.UpstreamFailure, ValueError, KeyError, TypeError, RecursionError):
            theirs = []
        known = {alias["id"] for alias in aliases}
        data = aliases + [m for m in theirs if isinstance(m, dict) and m.get("id") not in known]
        return json_response({"object": "list", "data": data})

    def _health(self, config: ProviderConfig) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "provider": config.name,
            "upstream": config.base_url,
            "uptime_seconds": round(self.clock() - self.started, 3),
            "can_serve": self.reporter.breakers.can_serve(config),
            "upstreams": self.reporter.breakers.describe(config),
            "sentry": self.reporter.sentry_health(),
            "rate_limiter": {"buckets": len(self.limiter)},
            "tokens": self.reporter.tokens_since_start(),
            "redis": self.reporter.state.health(),
            "capacity": self.capacity.snapshot(),
        }

    # --- the proxy -------------------------------------------------------------------------

    def _proxy(
        self,
        request: Inbound,
        ctx: RequestContext,
        config: ProviderConfig,
        match: routes.Match[Endpoint],
    ) -> Response:
        sent = self._forward(request, ctx, config, match)
        response = self._respond(
            ctx, sent.target.provider.endpoints[match.endpoint.local_path], sent.response
        )
        response.headers.append(("X-Apirouter-Upstream", sent.target.label))
        return response

    def _forward(
        self,
        request: Inbound,
        ctx: RequestContext,
        config: ProviderConfig,
        match: routes.Match[Endpoint],
    ) -> Sent:
        """Admit the request, then send it upstream (retrying, falling back); unread answer."""
        client_key = self._authorize(request.key)
        self._rate_limit(ctx, match.endpoint)
        return self.attempts.send(
            request, ctx, config, match, client_key, self.settings.max_body_bytes
        )

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

    def _rate_limit(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        limit = endpoint.rate_limit
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

    def _respond(
        self, ctx: RequestContext, endpoint: Endpoint, upstream_response: httpx.Response
    ) -> Response:
        """Relay the upstream's answer: a small answer of known length is read whole (one
        write, and its outcome recorded before it goes out); SSE is relayed as it arrives
        with heartbeats, and any other answer as bytes, keeping the upstream's
        Content-Length when it sent one, so memory stays bounded whatever the size."""
        status = upstream_response.status_code
        error = None
        if status >= 500:
            error = errors.UpstreamServerError(
                f"The upstream {ctx.upstream_host} answered HTTP {status}.", status
            )
        relayed = relayed_response_headers(upstream_response.headers.raw)
        content_type = upstream_response.headers.get("content-type", "")
        sse = content_type.startswith("text/event-stream")
        if sse:
            ours = {name.lower() for name, _ in SSE_HEADERS}  # replace, never duplicate
            relayed = [h for h in relayed if h[0].lower() not in ours] + SSE_HEADERS
        elif _small(upstream_response.headers.get("content-length")):
            return self._whole(ctx, endpoint, upstream_response, status, relayed, error)
        elif "content-length" in upstream_response.headers:
            relayed.append(("Content-Length", upstream_response.headers["content-length"]))
        timing = _Timing(self.clock, ctx)
        usage = _usage_reader(endpoint, content_type, upstream_response)
        relay = Relay(
            upstream_response,
            on_close=functools.partial(self._finish_relay, ctx, status, error, timing, usage, sse),
            heartbeat_seconds=endpoint.stream_config.heartbeat_interval_secs if sse else None,
            observer=usage,
            on_first_byte=timing.first_byte,
        )
        return Response(status, relayed, error=error, relay=relay)

    def _whole(
        self,
        ctx: RequestContext,
        endpoint: Endpoint,
        upstream_response: httpx.Response,
        status: int,
        relayed: list[tuple[str, str]],
        error: errors.RouterError | None,
    ) -> Response:
        timing = _Timing(self.clock, ctx)
        usage = _usage_reader(
            endpoint, upstream_response.headers.get("content-type", ""), upstream_response
        )
        chunks: list[bytes] = []
        try:
            for chunk in iter_raw(upstream_response):
                if not chunks:
                    timing.first_byte()
                chunks.append(chunk)
        finally:
            upstream_response.close()
        data = b"".join(chunks)
        if usage is not None:
            usage.feed(data)
            ctx.usage = usage.result()
        relayed.append(("Content-Length", str(len(data))))
        return Response(status, relayed, data, error)

    def _finish_relay(
        self,
        ctx: RequestContext,
        status: int,
        error: errors.RouterError | None,
        timing: _Timing,
        usage: UsageReader | None,
        sse: bool,
        relay_error: errors.RouterError | None,
    ) -> None:
        timing.finished(sse)
        if usage is not None:
            ctx.usage = usage.result()
        self.reporter.finish(ctx, Outcome(status, relay_error or error))

    def close(self) -> None:
        self.upstream.close()
        self.reporter.state.close()


# --- helpers ---------------------------------------------------------------------------------


WHOLE_ANSWER_BYTES = 64 * 1024  # answers of known length up to this are read whole


def _small(content_length: str | None) -> bool:
    return (
        content_length is not None
        and content_length.isdigit()
        and (int(content_length) <= WHOLE_ANSWER_BYTES)
    )


class _Timing:
    """Time to first byte (from sending the request) and, for streams, the stream's length."""

    def __init__(self, clock: Callable[[], float], ctx: RequestContext) -> None:
        self._clock = clock
        self._ctx = ctx
        self._headers_at = clock()  # the headers have just arrived
        self._first_at: float | None = None

    def first_byte(self) -> None:
        self._first_at = self._clock()
        self._ctx.first_byte_seconds = (self._ctx.upstream_seconds or 0.0) + (
            self._first_at - self._headers_at
        )

    def finished(self, sse: bool) -> None:
        if sse and self._first_at is not None:
            self._ctx.stream_seconds = self._clock() - self._first_at


def _usage_reader(
    endpoint: Endpoint, content_type: str, response: httpx.Response
) -> UsageReader | None:
    """A usage reader where the answer may carry token usage (JSON or SSE, usage routes)."""
    if endpoint.local_path not in USAGE_ROUTES:
        return None
    if not (content_type.startswith("text/event-stream") or "json" in content_type):
        return None
    return UsageReader(content_type, response.headers.get("content-encoding"))


def _model(alias: str, config: ProviderConfig) -> dict[str, Any]:
    return {
        "id": alias,
        "object": "model",
        "created": 0,
        "owned_by": config.name,
        "target": config.model_mapping[alias],
    }


def _not_found(path: str) -> errors.RouterError:
    if path == _REALTIME:  # /v1/realtime/client_secrets and /calls are plain HTTP
        return errors.NotImplementedHere(
            "The Realtime API uses WebSockets, which apirouter (a WSGI application) cannot "
            "carry: connect to the provider directly for /v1/realtime."
        )
    return errors.NotFound(f"Unknown path {path[:200]!r}: see the README for the endpoints.")


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Unknown')}"


def build(settings: Settings, target: str | None, *, tracking_enabled: bool = False) -> App:
    """Load the provider (name, path, else ``API_ROUTER_CONFIG_PATH``) and build the app."""
    target = target or settings.config_path
    config = load(target)
    path = Path(target) if target and target not in shipped_providers() else None
    return App(config, settings, config_path=path, tracking_enabled=tracking_enabled)
