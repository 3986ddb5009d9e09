"""What one request is, and how it ended: the two records every reporter reads.

``finish`` builds one ``Outcome`` per request; metrics, the access log, Sentry and the
failure tracker all read that same record, so they cannot disagree about what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from apirouter.errors import RouterError

if TYPE_CHECKING:
    import sentry_sdk

    from apirouter.observe.usage import Usage
    from apirouter.state.breakers import Target


class Trace(Protocol):
    """A request's Sentry transaction (``traces.RequestTrace``), as the request's path
    drives it. A protocol, so that the context need not know how tracing is done."""

    def attempt_started(
        self, target: Target, method: str, url: str, headers: dict[str, str]
    ) -> None: ...

    def attempt_ended(self, upstream_status: int | None, error: RouterError | None) -> None: ...

    def link(self, scope: sentry_sdk.Scope) -> None: ...

    def finish(self, ctx: RequestContext, outcome: Outcome) -> None: ...


@dataclass
class RequestContext:
    request_id: str
    method: str
    route: str  # a known route, or "other": safe as a metrics label
    provider: str  # the provider that served: the configured one, or a fallback
    key_label: str  # anonymized client key, or "anonymous"
    start: float
    target: Target | None = None  # the upstream of the last attempt
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier, retried attempts
    upstream_host: str = ""
    upstream_url: str = ""  # base URL + the upstream path template: no id, no query
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    # filled as the answer is relayed (usage metrics, access log, tracing)
    model: str | None = None  # the upstream model when modelMapping chose it, else None
    # the upstream model (mapped, else as sent): the scope of parks and of a model's
    # failures; client-chosen, so never a metric label
    scope_model: str | None = None
    first_byte_seconds: float | None = None  # request sent -> first body byte
    stream_seconds: float | None = None  # first byte -> last byte, for SSE streams
    usage: Usage | None = None  # tokens read from the answer; None: unknown
    trace: Trace | None = None  # Sentry transaction, only when this request is traced


@dataclass(frozen=True)
class Outcome:
    status: int
    error: RouterError | None = None
