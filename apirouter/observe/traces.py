"""Opt-in Sentry performance monitoring: one transaction per proxied request.

``SENTRY_TRACES_SAMPLE_RATE`` > 0 (with a DSN) turns it on; at 0 the app holds no
``Tracer``, ``RequestContext.trace`` stays ``None`` and each hook point is one ``is None``
branch: no transaction objects, no SDK calls.

What one traced request is:
- a transaction named by its route template (``POST /v1/chat/completions``, source
  ``route``), so ids in paths never split it into many names;
- one child span per upstream attempt (``gen_ai.chat``, ``gen_ai.embeddings``... on the
  model routes, ``http.client`` elsewhere); a retried attempt's span ends when it is given
  up, the last one when the answer has been relayed, so for a stream it covers the stream;
- Sentry's AI-monitoring attributes on the transaction and the span: ``gen_ai.system``,
  ``gen_ai.request.model`` (only the validated name ``modelMapping`` chose, as in metrics),
  ``gen_ai.usage.*`` when the answer's usage was read. Never a prompt, a completion, a
  header or a key: nothing here reads a body.

Rules kept (DESIGN.md §4):
- The transaction lives on the ``RequestContext`` and on a scope forked for this request
  alone, never on a shared or per-thread scope: a stream finishes on another thread, after
  ``App.__call__`` returned, and another request may already run on the first one.
- Each request starts its own trace. An incoming ``sentry-trace`` header is not continued:
  a client could otherwise force every one of its requests to be sampled.
- ``sentry-trace``/``baggage`` go upstream only to hosts listed in
  ``SENTRY_TRACE_PROPAGATION_TARGETS`` (the SDK's own ``trace_propagation_targets`` stays
  empty, so nothing else ever adds them).
- Tracing must never break serving: every hook swallows and logs its own failures.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import sentry_sdk
from sentry_sdk.tracing import Span, Transaction, TransactionSource

if TYPE_CHECKING:
    from apirouter.config.settings import Settings
    from apirouter.errors import RouterError
    from apirouter.observe.context import Outcome, RequestContext
    from apirouter.state.breakers import Target

log = logging.getLogger("apirouter.tracking")

# The model routes, by the gen_ai operation Sentry's AI views know them as.
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
# Span status for an attempt that got no HTTP answer (Sentry's span status vocabulary).
_NO_ANSWER_STATUS = {"upstream_timeout": "deadline_exceeded", "client_disconnected": "cancelled"}


def tracer(settings: Settings, tracking_enabled: bool) -> Tracer | None:
    """The app's tracer, or ``None`` (the whole cost of tracing when it is off)."""
    if not tracking_enabled or settings.sentry_traces_sample_rate <= 0:
        return None
    return Tracer(settings.sentry_trace_propagation_targets)


class Tracer:
    """Starts one ``RequestTrace`` per proxied request; knows where trace headers may go."""

    def __init__(self, propagation_targets: tuple[str, ...] = ()) -> None:
        self._targets = [re.compile(p, re.IGNORECASE) for p in propagation_targets]

    def propagates_to(self, host: str) -> bool:
        """A listed host, or a pattern matching the *whole* host name (``openai.com``
        must not match ``openai.com.attacker.example``)."""
        return any(pattern.fullmatch(host) for pattern in self._targets)

    def begin(self, ctx: RequestContext) -> RequestTrace | None:
        try:
            return RequestTrace(self, ctx)
        except Exception:
            log.warning("could not start the trace of request %s", ctx.request_id, exc_info=True)
            return None


class RequestTrace:
    """The transaction of one request and the span of its current upstream attempt."""

    __slots__ = ("_operation", "_scope", "_span", "_tracer", "transaction")

    def __init__(self, tracer: Tracer, ctx: RequestContext) -> None:
        self._tracer = tracer
        # A scope of this request's own: the SDK writes sampling data into the scope a
        # transaction starts on, and the transaction is sent through it when finished.
        self._scope = sentry_sdk.get_isolation_scope().fork()
        self._operation = _OPERATIONS.get(ctx.route)
        self.transaction = Transaction(
            name=f"{ctx.method} {ctx.route}",
            op="http.server",
            source=TransactionSource.ROUTE,
            origin="manual.apirouter",
        )
        self._scope.start_transaction(self.transaction)  # the sampling decision
        self._span: Span | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.transaction.sampled)

    # --- hooks -----------------------------------------------------------------------------

    def attempt_started(
        self, target: Target, method: str, url: str, headers: dict[str, str]
    ) -> None:
        """Open the span of one upstream attempt (closing a previous one left open) and,
        for a listed host only, add the trace headers to ``headers``. ``url`` names the
        route's template (``.../files/{id}``), never a concrete id."""
        try:
            self._end_span(None, None)
            parent: Span = self.transaction
            if self.sampled:
                op = f"gen_ai.{self._operation}" if self._operation else "http.client"
                span = self.transaction.start_child(
                    op=op,
                    name=self._operation or f"{method} {url}",
                    origin="manual.apirouter",
                )
                span.set_data("http.request.method", method)
                # not server.address: the SDK fills that with this machine's name
                span.set_data("apirouter.upstream_host", target.upstream.host)
                span.set_data("apirouter.upstream", target.label)
                self._span = parent = span
            if self._tracer.propagates_to(target.upstream.host):
                headers.update(parent.iter_headers())
        except Exception:
            log.warning("tracing an upstream attempt failed", exc_info=True)

    def attempt_ended(self, upstream_status: int | None, error: RouterError | None) -> None:
        """A retried attempt is over (the last attempt ends in ``finish``)."""
        try:
            self._end_span(upstream_status, error)
        except Exception:
            log.warning("tracing an upstream attempt failed", exc_info=True)

    def link(self, scope: sentry_sdk.Scope) -> None:
        """Make an error event captured on ``scope`` part of this request's trace, under the
        span of the attempt that failed."""
        scope.span = self._span or self.transaction
        scope.set_transaction_name(self.transaction.name, TransactionSource.ROUTE)

    def finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Close the last span and send the transaction (if sampled). Runs once, on whatever
        thread finished the request, possibly long after ``App.__call__`` returned."""
        try:
            self._finish(ctx, outcome)
        except Exception:
            log.warning("could not finish the trace of request %s", ctx.request_id, exc_info=True)

    # --- the attributes --------------------------------------------------------------------

    def _finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        transaction = self.transaction
        if not self.sampled:
            transaction.finish(scope=self._scope)  # the SDK counts it as sampled away
            return
        attributes = _gen_ai_attributes(ctx, self._operation)
        span = self._span
        if span is not None:
            span.update_data(attributes)
            span.update_data(_timings(ctx))
            if self._operation and ctx.model:
                span.description = f"{self._operation} {ctx.model}"
            self._end_span(ctx.upstream_status, outcome.error)
        transaction.update_data(attributes)
        transaction.set_http_status(outcome.status)
        tags = {
            "request_id": ctx.request_id,
            "route": ctx.route,
            "provider": ctx.provider,
            "upstream": ctx.target.label if ctx.target else "none",
            "attempts": str(len(ctx.attempts) + (1 if ctx.target else 0)),
        }
        if outcome.error is not None:
            tags["error_type"] = outcome.error.error_type
        for name, value in tags.items():
            transaction.set_tag(name, value)
        transaction.finish(scope=self._scope)

    def _end_span(self, upstream_status: int | None, error: RouterError | None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        if upstream_status is not None:
            span.set_http_status(upstream_status)
        if error is not None:
            span.set_data("apirouter.error_type", error.error_type)
            if upstream_status is None or error.error_type == "client_disconnected":
                span.set_status(_NO_ANSWER_STATUS.get(error.error_type, "unavailable"))
        span.finish(scope=self._scope)


def _gen_ai_attributes(ctx: RequestContext, operation: str | None) -> dict[str, Any]:
    """Sentry's AI-monitoring attributes, from what the relay recorded on the context."""
    if operation is None:
        return {}
    attributes: dict[str, Any] = {
        "gen_ai.system": ctx.provider,
        "gen_ai.provider.name": ctx.provider,  # gen_ai.system's successor in newer SDKs
        "gen_ai.operation.name": operation,
    }
    if ctx.model:
        attributes["gen_ai.request.model"] = ctx.model
    usage = ctx.usage
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.input
        attributes["gen_ai.usage.input_tokens.cached"] = usage.cached_input
        attributes["gen_ai.usage.output_tokens"] = usage.output
        attributes["gen_ai.usage.total_tokens"] = usage.input + usage.output
    return attributes


def _timings(ctx: RequestContext) -> dict[str, Any]:
    """The last attempt's timings, in seconds (a span's own duration covers the whole
    exchange: request sent to last byte relayed)."""
    timings: dict[str, Any] = {}
    if ctx.upstream_seconds is not None:
        timings["apirouter.response_headers_seconds"] = ctx.upstream_seconds
    if ctx.first_byte_seconds is not None:
        timings["apirouter.first_byte_seconds"] = ctx.first_byte_seconds
    if ctx.stream_seconds is not None:
        timings["apirouter.stream_seconds"] = ctx.stream_seconds
        timings["gen_ai.response.streaming"] = True
        if ctx.first_byte_seconds is not None:
            timings["gen_ai.response.time_to_first_chunk"] = ctx.first_byte_seconds
    return timings
