"""The WSGI application: the route table, the proxy's steps, and the responses.

Every request ends in exactly one ``Reporter.finish(ctx, outcome)``. Plain responses
finish before they are returned; streamed ones finish when the server closes the relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from apirouter import __version__, errors
from apirouter.config import routes
from apirouter.config.provider import (
    ConfigStore,
    Endpoint,
    ProviderConfig,
    load,
    shipped_providers,
)
from apirouter.config.settings import Settings
from apirouter.observe import traces
from apirouter.observe.context import Outcome, RequestContext
from apirouter.observe.keys import anonymize
from apirouter.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from apirouter.observe.report import Reporter
from apirouter.proxy import inbound
from apirouter.proxy.admission import Admission
from apirouter.proxy.answer import Answers
from apirouter.proxy.attempts import Attempts, Sent, routed_endpoint
from apirouter.proxy.capacity import build_gate, readiness
from apirouter.proxy.inbound import Inbound
from apirouter.proxy.models import alias_model, list_models
from apirouter.proxy.probes import HealthChecker
from apirouter.proxy.response import Response, error_response, json_response, status_line
from apirouter.upstream.client import Upstream

StartResponse = Callable[..., Any]
_LOCAL_ROUTES = frozenset(("/health", "/health/ready", "/metrics"))
_LOCAL_METHODS = ("GET", "HEAD")
_MODELS = "/v1/models"
# Anthropic's own routes: errors the app writes there take Anthropic's shape, for its SDK
ANTHROPIC_ROUTES = frozenset(
    {"/v1/messages", "/v1/messages/count_tokens", "/v1/messages/*", "/v1/complete/*"}
)
MAX_URL_BYTES = 16 * 1024  # longer request targets get 414, as nginx's large buffers do
KNOWN_TARGETS = 1024  # request targets whose body limit is remembered (see App.body_limit)
ADMIN_ENVIRON_KEY = "apirouter.admin"  # set by the admin listener on its requests


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
            self.upstream,
            self.reporter.breakers,
            self.reporter,
            settings.environment,
            clock,
            max_park_seconds=settings.max_park_seconds,
        )
        self.reporter.watch_upstreams(config)
        self.metrics.track_can_serve(
            config.name, lambda: self.reporter.breakers.can_serve(self.store.current)
        )
        self.health_checker = HealthChecker(
            lambda: self.store.current,
            self.upstream,
            self.reporter,
            settings.environment,
            clock,
            default_key=settings.default_api_key,
        )
        self.metrics.track_bucket_count(lambda: len(self.limiter))
        self.capacity = build_gate(settings, self.metrics)  # proxied requests in flight
        self.admission = Admission(settings, self.limiter)
        self.answers = Answers(self.reporter, clock)
        self._body_limits: tuple[ProviderConfig | None, dict[str, int]] = (None, {})

    # --- WSGI entry point ------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = self.store.current
        path = environ.get("PATH_INFO") or "/"
        match, refused = (
            (None, None) if path in _LOCAL_ROUTES else _route(config, routes.raw_path(environ))
        )
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
            if refused is not None:
                raise refused
            response = self._dispatch(request, ctx, config, match)
        except errors.RouterError as error:
            response = error_response(error, anthropic=request.route in ANTHROPIC_ROUTES)
        except Exception as exc:  # never a traceback to the client; reported once in finish
            internal = errors.InternalError(
                f"Internal error while handling the request ({ctx.request_id})."
            )
            internal.__cause__ = exc
            response = error_response(internal, anthropic=request.route in ANTHROPIC_ROUTES)
        response.headers.append(("X-Request-ID", ctx.request_id))
        if request.method == "HEAD":  # RFC 9110 §9.3.2: the GET headers, never a body
            response.headers.append(("Content-Length", str(len(response.body))))
        write = start_response(status_line(response.status), response.headers)
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
        routes.check_target(request.environ)
        if request.headers.get("upgrade", "").lower() == "websocket":
            raise _websocket(request.path)
        if match is None and request.route == "other":
            raise _not_found(request.path)
        allowed = match.endpoint.methods if match else _LOCAL_METHODS
        if request.method not in allowed:
            raise errors.MethodNotAllowed(
                f"Method {request.method} is not allowed here; use {' or '.join(allowed)}.",
                list(allowed),
            )
        if match is None:
            if request.route == "/metrics" and not self._serves_metrics(request.environ):
                raise _not_found(request.path)
            return self._local(request.route)
        routes.check_segments(match.params)
        alias = match.params.get("model")
        if request.route == _MODELS + "/{model}" and unquote(alias or "") in config.model_mapping:
            self.admission.authorize(request.key)  # the same key /v1/models asks for
            return json_response(alias_model(unquote(alias or ""), config))
        # every proxied request takes a slot: 503 over_capacity at once when none is free
        if request.route == _MODELS and not request.query:  # a paged list goes as it is
            listing = routes.Match(match.endpoint, {})

            def fetch() -> httpx.Response:
                return self._forward(request, ctx, config, listing).response

            return self.capacity.admit(ctx.key_label, lambda: list_models(config, fetch))
        return self.capacity.admit(ctx.key_label, lambda: self._proxy(request, ctx, config, match))

    # --- local endpoints -------------------------------------------------------------------

    def _serves_metrics(self, environ: Mapping[str, Any]) -> bool:
        """/metrics is served on the admin port, and on the main port unless
        ``APIROUTER_METRICS_ON_MAIN_PORT=0`` moved it to the admin port alone."""
        settings = self.settings
        return (
            settings.metrics_on_main_port
            or settings.admin_port is None
            or bool(environ.get(ADMIN_ENVIRON_KEY))
        )

    def _local(self, route: str) -> Response:
        if route == "/metrics":
            return Response(200, [("Content-Type", METRICS_CONTENT_TYPE)], self.metrics.render())
        if route == "/health/ready":
            status, document = readiness(self.capacity, config_loaded=True)
            return json_response(document, status)
        return json_response(self._health(self.store.current))

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
        endpoint = routed_endpoint(sent.target.provider, match)
        response = self.answers.respond(ctx, endpoint, sent.response, request.hangup)
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
        client_key = self.admission.authorize(request.key)
        self.admission.rate_limit(ctx, match.endpoint)
        return self.attempts.send(
            request,
            ctx,
            config,
            match,
            client_key,
            self.settings.max_body_bytes,
            own_key=self.admission.forwards_own_key(request.key),
        )

    def body_limit(self, target: str) -> int:
        """The largest body the route of a request target (its raw URI) accepts: the
        embedded server checks it from the request line, before reading the body.

        Remembered per target for the current config (a reload starts afresh), up to
        ``KNOWN_TARGETS``: most requests name a handful of targets, and the app matches
        the route again anyway once the request is whole."""
        config = self.store.current
        known_for, known = self._body_limits
        if known_for is not config:
            known = {}
            self._body_limits = (config, known)
        limit = known.get(target)
        if limit is None:
            match = config.routes.match(routes.target_path(target))
            limit = (match.endpoint.max_body_bytes if match else 0) or self.settings.max_body_bytes
            if len(known) < KNOWN_TARGETS:
                known[target] = limit
        return limit

    def client_stalled(self, target: str) -> None:
        """The server disconnected a client that took no byte for the write timeout. It
        counts every stall here, by its last request's target: the stall may come after
        that request's ``finish`` (an answer queued whole), so ``finish`` does not."""
        path = routes.target_path(target)
        match, _ = (None, None) if path in _LOCAL_ROUTES else _route(self.store.current, path)
        route = match.endpoint.local_path if match else path if path in _LOCAL_ROUTES else "other"
        self.metrics.client_disconnects.labels(route, errors.ClientStalled.error_type).inc()

    def close(self) -> None:
        self.upstream.close()
        self.reporter.state.close()


# --- helpers ---------------------------------------------------------------------------------


def _route(
    config: ProviderConfig, raw_path: str
) -> tuple[routes.Match[Endpoint] | None, errors.RouterError | None]:
    """The request's route (a template, else pass-through), or why its path is refused."""
    try:
        return config.match(raw_path), None
    except errors.BadRequest as refused:
        return None, refused


def _not_found(path: str) -> errors.RouterError:
    return errors.NotFound(
        f"Unknown path {path[:200]!r}: no route matches it, and it is not passed through "
        "(admin APIs never are; see the README's endpoint table)."
    )


def _websocket(path: str) -> errors.RouterError:
    """Realtime over plain HTTP (client secrets, calls, sessions) passes through; only its
    WebSocket cannot be carried by a WSGI application."""
    return errors.NotImplementedHere(
        f"{path[:200]!r} asks for a WebSocket upgrade: WebSockets cannot be carried by "
        "apirouter (a WSGI application); connect to the provider directly for them."
    )


def build(settings: Settings, target: str | None, *, tracking_enabled: bool = False) -> App:
    """Load the provider (name, path, else ``API_ROUTER_CONFIG_PATH``) and build the app."""
    target = target or settings.config_path
    config = load(target)
    path = Path(target) if target and target not in shipped_providers() else None
    return App(config, settings, config_path=path, tracking_enabled=tracking_enabled)
