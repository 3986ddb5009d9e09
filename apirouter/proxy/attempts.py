"""Sending one client request upstream: choose an upstream, attempt, and retry or fall back.

Whether the request is stateful is decided first (``statefulness``), before any target
is chosen: a stateful request goes to the provider's first upstream only. What may be
retried, and only before the client has received a byte:
- a connect, DNS or TLS failure (nothing reached the upstream): on another target, or on a
  lone target (stateful requests have one) once more, after a jittered 100-300 ms;
- for stateless requests only, on another target: a timeout before the response headers
  (``firstByteTimeoutSecs``) and an upstream 5xx, when ``retryOn`` names it and the answer
  is not an SSE stream;
- a 429 on an operator key, when ``retryOn`` names ``429``, on a target with another key.

Never retried: a 429 on the client's own key (its quota: relayed, nothing parked), 5xx
answers and timeouts of a lone target (the client's SDK backs off itself; the router must
not multiply its retries), bodies over 1 MiB (streamed upstream as they arrive, never held
whole, so there is nothing to send again), and anything once the answer started to flow.
A 429 on an operator key parks that (upstream, model) until ``Retry-After`` (at most
``APIROUTER_MAX_PARK_SECONDS``); the retry budget caps the time spent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from apirouter import errors
from apirouter.config.headers import KEY_HEADERS
from apirouter.config.provider import Endpoint, ProviderConfig
from apirouter.config.routes import Match
from apirouter.observe.context import RequestContext
from apirouter.observe.report import Reporter
from apirouter.proxy import forward
from apirouter.proxy.inbound import Body, Inbound
from apirouter.proxy.statefulness import is_stateful
from apirouter.state.breakers import Breakers, Target, scope_model
from apirouter.upstream.client import Upstream
from apirouter.upstream.retry_after import park_seconds

LONE_RETRY_PAUSE = (0.1, 0.3)  # seconds: a lone target's connect failure is retried once
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
    own_key: bool = False  # client_key is the client's own (pass-through), not the operator's
    tried: list[str] = field(default_factory=list)
    started: float = 0.0
    stateful: bool = True
    sent_model: str | None = None
    bodies: dict[str, tuple[Endpoint, Body]] = field(default_factory=dict)  # per provider
    served_by_fallback: str | None = None


class Attempts:
    def __init__(
        self,
        upstream: Upstream,
        breakers: Breakers,
        reporter: Reporter,
        environment: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        *,
        max_park_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self.breakers = breakers
        self.reporter = reporter
        self.environment = environment  # where apiKeyEnv names are looked up
        self.clock = clock
        self.max_park_seconds = max_park_seconds
        self.sleep = sleep  # the pause before a lone target's connect retry
        self.wall = wall  # Retry-After may be an HTTP-date
        self._rng = random.Random()

    def send(
        self,
        request: Inbound,
        ctx: RequestContext,
        config: ProviderConfig,
        match: Match[Endpoint],
        client_key: str | None,
        body_limit: int,
        *,
        own_key: bool = False,
    ) -> Sent:
        plan = _Plan(
            request, ctx, config, match, client_key, body_limit, own_key, started=self.clock()
        )
        _, first = self._body(plan, config)  # read and checked before any target is claimed
        plan.stateful = is_stateful(request.method, match.endpoint.local_path, first)
        plan.sent_model = first.sent_model
        target = self._choose(plan)
        while True:
            try:
                endpoint, body = self._body(plan, target.provider)
            except BaseException:  # refused before reaching it: give back a claimed probe
                self.breakers.release(target.key)
                raise
            ctx.model = body.model
            try:
                response = self._attempt(plan, target, endpoint, body)
            except errors.UpstreamFailure as error:
                next_target = self._retry_target(plan, target, _reason(error), body)
                if next_target is None:
                    raise
                self._retried(plan, target, error, error.status, _reason(error))
                target = next_target
                continue
            reason = _status_reason(response)
            next_target = self._retry_target(plan, target, reason, body) if reason else None
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
        target = self.breakers.choose(
            plan.config, plan.tried, plan.stateful, plan.match.endpoint, plan.sent_model
        )
        if target is None:
            wait = self.breakers.retry_after(plan.config)
            where = "The first upstream" if plan.stateful else "Every upstream"
            raise errors.NoHealthyUpstream(
                f"{where} of {plan.config.name} that can serve this request is cooling down "
                f"after repeated failures; retry in {wait}s.",
                wait,
            )
        return target

    def _body(self, plan: _Plan, provider: ProviderConfig) -> tuple[Endpoint, Body]:
        """The body as ``provider`` gets it (its own modelMapping), read once per provider."""
        prepared = plan.bodies.get(provider.name)
        if prepared is not None:
            return prepared
        endpoint = routed_endpoint(provider, plan.match)
        body = plan.request.read_body(endpoint, provider.model_mapping, plan.body_limit)
        if body.stream and not endpoint.stream_support:
            raise errors.BadRequest(f"Streaming is not supported on {endpoint.local_path}.")
        plan.bodies[provider.name] = endpoint, body
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
        ctx.scope_model = scope_model(target.provider, plan.sent_model)
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
            operator_key=target.fallback or bool(target.upstream.api_key_env),
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
        if response.status_code == 429 and self._operator_key(plan, target, endpoint):
            self._park(target, ctx.scope_model, response)
        return response

    def _park(self, target: Target, model: str | None, response: httpx.Response) -> None:
        """An operator key's 429: park this (upstream, model) for its Retry-After."""
        seconds = park_seconds(
            response.headers.get("retry-after"), self.max_park_seconds, self.wall()
        )
        if seconds > 0:
            self.breakers.park(target.key, model, seconds)

    def _key(self, plan: _Plan, target: Target) -> str | None:
        """The upstream's own operator key when configured, else the client's (or the
        default) key; fallbacks always carry an operator key (check-config insists)."""
        if target.upstream.api_key_env:
            return self.environment.get(target.upstream.api_key_env) or None
        return None if target.fallback else plan.client_key

    def _operator_key(self, plan: _Plan, target: Target, endpoint: Endpoint) -> bool:
        """Does this attempt spend the operator's quota? Only the client's own key,
        forwarded as it came, is the client's business (its 429 parks nothing)."""
        if not plan.own_key or target.fallback or target.upstream.api_key_env:
            return True
        configured = (*target.provider.headers, *endpoint.headers)
        return any(name.lower() in KEY_HEADERS for name in configured)

    # --- retrying ----------------------------------------------------------------------

    def _retry_target(
        self, plan: _Plan, failed: Target, reason: str | None, body: Body
    ) -> Target | None:
        """Where to send the request again, or None: the client gets this answer."""
        policy = plan.config.retry
        if (
            reason is None
            or reason not in policy.retry_on
            or len(plan.tried) >= policy.max_attempts
            or not body.replayable
            or (plan.stateful and reason != "connect")  # it may have created something
        ):
            return None
        budget = policy.budget_seconds
        if budget is not None and self.clock() - plan.started >= budget:
            return None
        accept = None
        if reason == "429":
            endpoint = routed_endpoint(failed.provider, plan.match)
            if not self._operator_key(plan, failed, endpoint):
                return None  # the client's own quota: another key must not pay for it
            spent = self._key(plan, failed)
            accept = lambda t: self._key(plan, t) != spent  # noqa: E731
        endpoint = plan.match.endpoint
        target = self.breakers.choose(
            plan.config, plan.tried, plan.stateful, endpoint, plan.sent_model, accept=accept
        )
        if target is None and reason == "connect" and self._lone(plan, failed):
            self.sleep(self._rng.uniform(*LONE_RETRY_PAUSE))  # nothing reached it: once more
            target = self.breakers.choose(
                plan.config, plan.tried, plan.stateful, endpoint, plan.sent_model, again=True
            )
        return target

    def _lone(self, plan: _Plan, failed: Target) -> bool:
        """Is ``failed`` the only target this request may use, tried only once so far?"""
        chain = self.breakers.chain(plan.config, plan.stateful, plan.match.endpoint)
        return len(chain) == 1 and plan.tried.count(failed.key) == 1

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


def routed_endpoint(provider: ProviderConfig, match: Match[Endpoint]) -> Endpoint:
    """The route as ``provider`` serves it (a fallback has its own settings for it); a
    passed-through request stays with the provider whose route matched."""
    if match.endpoint.passthrough:
        return match.endpoint
    return provider.endpoints[match.endpoint.local_path]


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
