"""Sending one client request upstream: choose an upstream, attempt, and retry or fall back.

What may be retried, and only before the client has received a byte:
- a connect, DNS or TLS failure (nothing reached the upstream);
- a timeout before the response headers (``firstByteTimeoutSecs``), only on the completion
  routes, where a duplicate costs tokens but creates no object;
- an upstream 5xx or 429, when ``retryOn`` names it and the answer is not an SSE stream.

Never retried: bodies over 1 MiB (streamed upstream as they arrive, never held whole, so
there is nothing to send again), stateful routes (files, batches, ``responses/{id}``,
bodies naming a ``previous_response_id``: the object lives with one account, so they stay
on the provider's first upstream and never fall back), and anything once the answer
started to flow. Each retry goes to another upstream when one is healthy;
a 429 parks its upstream until ``Retry-After``; the retry budget caps the time spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from apirouter import errors
from apirouter.config.provider import Endpoint, ProviderConfig
from apirouter.config.routes import Match
from apirouter.observe.context import RequestContext
from apirouter.observe.report import Reporter
from apirouter.proxy import forward
from apirouter.proxy.inbound import Body, Inbound
from apirouter.state.breakers import Breakers, Target
from apirouter.upstream.client import Upstream

COMPLETION_ROUTES = frozenset(
    (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    )
)
STATEFUL_PREFIXES = ("/v1/files", "/v1/batches", "/v1/responses/")
_CONNECT_FAILURES = (errors.UpstreamConnectError, errors.UpstreamDNSError, errors.UpstreamTLSError)


@dataclass
class Sent:
    """The answer that will be relayed, and who gave it."""

    response: httpx.Response
    target: Target


@dataclass
class _Plan:
    request: Inbound
    ctx: RequestContext
    config: ProviderConfig
    match: Match[Endpoint]
    client_key: str | None  # the key chosen for the configured provider (client's or default)
    body_limit: int
    tried: list[str] = field(default_factory=list)
    started: float = 0.0
    pinned: bool = False
    served_by_fallback: str | None = None


class Attempts:
    def __init__(
        self,
        upstream: Upstream,
        breakers: Breakers,
        reporter: Reporter,
        environment: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.breakers = breakers
        self.reporter = reporter
        self.environment = environment  # where apiKeyEnv names are looked up
        self.clock = clock

    def send(
        self,
        request: Inbound,
        ctx: RequestContext,
        config: ProviderConfig,
        match: Match[Endpoint],
        client_key: str | None,
        body_limit: int,
    ) -> Sent:
        plan = _Plan(request, ctx, config, match, client_key, body_limit, started=self.clock())
        plan.pinned = match.endpoint.local_path.startswith(STATEFUL_PREFIXES)
        target = self._choose(plan)
        while True:
            try:
                endpoint, body = self._prepare(plan, target)
            except BaseException:  # refused before reaching it: give back a claimed probe
                self.breakers.release(target.key)
                raise
            plan.pinned = plan.pinned or body.pinned
            ctx.model = body.model
            try:
                response = self._attempt(plan, target, endpoint, body)
            except errors.UpstreamFailure as error:
                next_target = self._retry_target(plan, _reason(error), body)
                if next_target is None:
                    raise
                self._retried(plan, target, error, error.status, _reason(error))
                target = next_target
                continue
            reason = _status_reason(response)
            next_target = self._retry_target(plan, reason, body) if reason else None
            if next_target is None:
                return Sent(response, target)
            response.close()
            failure = None
            if reason != "429":
                failure = errors.UpstreamServerError(
                    f"The upstream {target.upstream.host} answered HTTP {response.status_code}.",
                    response.status_code,
                )
            self._retried(plan, target, failure, response.status_code, reason)
            target = next_target

    # --- one attempt -------------------------------------------------------------------

    def _choose(self, plan: _Plan) -> Target:
        target = self.breakers.choose(plan.config, plan.tried, plan.pinned, plan.match.endpoint)
        if target is None:
            wait = self.breakers.retry_after(plan.config)
            raise errors.NoHealthyUpstream(
                f"Every upstream of {plan.config.name} (and its fallbacks) is cooling down "
                f"after repeated failures; retry in {wait}s.",
                wait,
            )
        return target

    def _prepare(self, plan: _Plan, target: Target) -> tuple[Endpoint, Body]:
        endpoint = target.provider.endpoints[plan.match.endpoint.local_path]
        mapping = target.provider.model_mapping
        body = plan.request.read_body(endpoint, mapping, plan.body_limit)
        if body.stream and not endpoint.stream_support:
            raise errors.BadRequest(f"Streaming is not supported on {endpoint.local_path}.")
        return endpoint, body

    def _attempt(
        self, plan: _Plan, target: Target, endpoint: Endpoint, body: Body
    ) -> httpx.Response:
        ctx = plan.ctx
        plan.tried.append(target.key)
        ctx.target, ctx.provider, ctx.upstream_host = (
            target,
            target.provider.name,
            target.upstream.host,
        )
        if target.fallback and plan.served_by_fallback != target.provider.name:
            plan.served_by_fallback = target.provider.name
            self.reporter.fell_back(plan.config.name, target.provider.name)
        url = forward.upstream_url(
            target.upstream.base_url, endpoint, plan.request.query, plan.match.params
        )
        headers = forward.upstream_headers(
            plan.request.headers,
            target.provider,
            endpoint,
            self._key(plan, target),
            ctx.request_id,
            body.content_type,
        )
        if body.length is not None:  # a streamed body keeps a fixed length upstream
            headers["content-length"] = str(body.length)
        # Sentry names the upstream host and the route's template, never a concrete id
        # (a file id, a model name a client made up) nor the query
        ctx.upstream_url = target.upstream.base_url + endpoint.upstream_path
        if ctx.trace is not None:  # a span per attempt; trace headers for listed hosts
            ctx.trace.attempt_started(target, plan.request.method, ctx.upstream_url, headers)
        ctx.upstream_status = None
        sent_at = self.clock()
        try:
            response = self.upstream.send(
                plan.request.method,
                url,
                headers,
                body.content(),
                first_byte_timeout=target.provider.retry.first_byte_timeout_secs,
                configured_url=not plan.match.params and not plan.request.query,
                gone=plan.request.hangup,
            )
        finally:
            ctx.upstream_seconds = self.clock() - sent_at
        ctx.upstream_status = response.status_code
        if response.status_code == 429:
            self.breakers.park(target.key, _retry_after(response))
        return response

    def _key(self, plan: _Plan, target: Target) -> str | None:
        """The upstream's own operator key when configured, else the client's (or the
        default) key; fallbacks always carry an operator key (check-config insists)."""
        if target.upstream.api_key_env:
            return self.environment.get(target.upstream.api_key_env) or None
        return None if target.fallback else plan.client_key

    # --- retrying ----------------------------------------------------------------------

    def _retry_target(self, plan: _Plan, reason: str | None, body: Body) -> Target | None:
        policy = plan.config.retry
        if (
            reason is None
            or reason not in policy.retry_on
            or len(plan.tried) >= policy.max_attempts
            or not body.replayable
            or (reason == "timeout" and plan.match.endpoint.local_path not in COMPLETION_ROUTES)
        ):
            return None
        budget = policy.budget_seconds
        if budget is not None and self.clock() - plan.started >= budget:
            return None
        return self.breakers.choose(plan.config, plan.tried, plan.pinned, plan.match.endpoint)

    def _retried(
        self,
        plan: _Plan,
        target: Target,
        error: errors.RouterError | None,
        status: int,
        reason: str | None,
    ) -> None:
        plan.ctx.attempts.append(
            {
                "upstream": target.label,
                "status": status,
                "error_type": error.error_type if error else "rate_limited",
                "seconds": round(plan.ctx.upstream_seconds or 0.0, 3),
            }
        )
        self.reporter.attempt_retried(plan.ctx, target, error, status, reason or "5xx")
        # reported: finish must not record this attempt again if the next one never starts
        plan.ctx.target, plan.ctx.upstream_status = None, None
        if plan.ctx.trace is not None:
            plan.ctx.trace.attempt_ended(plan.ctx.upstream_status, error)


def _reason(error: errors.UpstreamFailure) -> str | None:
    if isinstance(error, _CONNECT_FAILURES):
        return "connect"
    if isinstance(error, errors.UpstreamTimeout):
        return "timeout"  # send() only raises before the response headers arrived
    return None


def _status_reason(response: httpx.Response) -> str | None:
    status = response.status_code
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return None  # a stream that started is the client's from now on
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else None


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, min(float(value), 3600.0))
    except ValueError:
        return 1.0
