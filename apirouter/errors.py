"""The one error taxonomy of apirouter.

Every failure a request can end in is one of these classes. Each class knows, as class
attributes, everything the rest of the code needs: the HTTP status sent to the client, the
``error_type`` tag used in metrics, logs and Sentry, the Sentry level, whether it is reported
to Sentry at all, and whether it counts as an upstream failure for alerting. Nothing else
keeps its own mapping table.

    RouterError
    ├── ClientError                     the client's mistake: 4xx, not reported by default
    │   ├── BadRequest                  400
    │   │   └── InvalidJSON             400 body is not JSON we can read (syntax, depth, digits)
    │   ├── Unauthorized                401
    │   ├── NotFound                    404
    │   ├── MethodNotAllowed            405 (carries the allowed methods)
    │   ├── PayloadTooLarge             413
    │   ├── URITooLong                  414
    │   ├── UnsupportedMediaType        415
    │   ├── RateLimited                 429 (carries Retry-After)
    │   └── NotImplementedHere          501 a route WSGI cannot carry (the Realtime API)
    ├── ClientDisconnected              499 in metrics and logs, never sent to Sentry
    │   └── ClientStalled               ... or accepted no byte for the write timeout
    ├── NoHealthyUpstream               503 every upstream and fallback is cooling down
    ├── OverCapacity                    503 + Retry-After: every slot is taken; not reported
    ├── ServerError                     ours: 500, reported
    │   ├── ConfigError                 the provider config cannot serve this request
    │   └── InternalError               an unhandled exception
    └── UpstreamFailure                 the provider's fault: reported, counts for alerting
        ├── UpstreamConnectError        502 refused / unreachable
        ├── UpstreamDNSError            502 host name did not resolve
        ├── UpstreamTLSError            502 TLS handshake or certificate failure
        ├── UpstreamProtocolError       502 broken or truncated HTTP response
        ├── UpstreamStreamCut           the body was cut after the client got the headers
        ├── UpstreamTimeout             504
        ├── UpstreamServerError         the upstream's own 5xx, passed through as sent
        └── HealthCheckFailed           an active health check got a 5xx (no client involved)
            └── HealthCheckAuth         ... or a 401/403: the operator's key was refused

Upstream 4xx responses are the client's business: passed through untouched and never an
error here. httpx exceptions are translated into this tree in exactly one place,
``apirouter.upstream.client.translate_httpx_error``.
"""

from __future__ import annotations

import json
from typing import Literal

SentryLevel = Literal["fatal", "error", "warning", "info", "debug"]


class RouterError(Exception):
    """Base of every failure a request can end in."""

    status: int = 500
    error_type: str = "internal_error"
    openai_type: str = "server_error"
    anthropic_type: str = "api_error"  # the error shape on Anthropic's routes (/v1/messages)
    sentry_level: SentryLevel = "error"
    reported: bool = True
    upstream_failure: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response_headers(self) -> list[tuple[str, str]]:
        """Extra headers the client must see with this error (Allow, Retry-After...)."""
        return []

    def body(self) -> bytes:
        """The OpenAI-style error body: ``{"error": {"message", "type", "code"}}``."""
        error = {"message": self.message, "type": self.openai_type, "code": self.error_type}
        return json.dumps({"error": error}).encode()

    def anthropic_body(self) -> bytes:
        """Anthropic's error shape, for its SDK on its routes:
        ``{"type": "error", "error": {"type", "message"}}``. The router's own code (the
        OpenAI shape's ``code``) stays in the message."""
        message = f"{self.message} (apirouter: {self.error_type})"
        error = {"type": self.anthropic_type, "message": message}
        return json.dumps({"type": "error", "error": error}).encode()


class ClientError(RouterError):
    """The client sent something we cannot accept. Not a Sentry event by default."""

    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    sentry_level: SentryLevel = "info"
    reported = False


class BadRequest(ClientError):
    status = 400
    error_type = "bad_request"


class InvalidJSON(BadRequest):
    error_type = "invalid_json"


class Unauthorized(ClientError):
    status = 401
    error_type = "unauthorized"
    openai_type = "authentication_error"
    anthropic_type = "authentication_error"


class NotFound(ClientError):
    status = 404
    error_type = "not_found"
    anthropic_type = "not_found_error"


class MethodNotAllowed(ClientError):
    status = 405
    error_type = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def response_headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allowed))]


class PayloadTooLarge(ClientError):
    status = 413
    error_type = "payload_too_large"
    anthropic_type = "request_too_large"


class URITooLong(ClientError):
    status = 414
    error_type = "uri_too_long"


class UnsupportedMediaType(ClientError):
    status = 415
    error_type = "unsupported_media_type"


class RateLimited(ClientError):
    status = 429
    error_type = "rate_limited"
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def response_headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after_seconds))]


class NotImplementedHere(ClientError):
    """The client asked for something apirouter cannot carry: not a fault, not reported."""

    status = 501
    error_type = "not_implemented"


class ClientDisconnected(RouterError):
    """The client went away before the response was complete: counted, never reported."""

    status = 499
    error_type = "client_disconnected"
    sentry_level: SentryLevel = "info"
    reported = False


class ClientStalled(ClientDisconnected):
    """The client accepted no byte of its response for ``APIROUTER_WRITE_TIMEOUT_SECONDS``:
    the server disconnected it, freeing its slot, worker and upstream connection."""

    error_type = "client_stalled"


def client_gone(reason: str | None, message: str) -> ClientDisconnected:
    """The error for a client the server saw leave (``reason``: the server's word)."""
    if reason == ClientStalled.error_type:
        return ClientStalled(message)
    return ClientDisconnected(message)


class NoHealthyUpstream(RouterError):
    """Every upstream (and fallback) is cooling down: refused at once, with no doomed
    connection. Not an upstream failure itself: no attempt was made."""

    status = 503
    error_type = "no_healthy_upstream"
    anthropic_type = "overloaded_error"
    sentry_level: SentryLevel = "warning"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def response_headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after_seconds))]


class OverCapacity(RouterError):
    """This router has no free slot (or this client key has used its share): 503.

    Refused at once rather than queued, so a load balancer or client retries elsewhere.
    Not a Sentry event and not an upstream failure: being full is expected under load, and
    alerting on it would page for the provider's innocence.
    """

    status = 503
    error_type = "over_capacity"
    anthropic_type = "overloaded_error"
    openai_type = "server_error"
    sentry_level: SentryLevel = "warning"
    reported = False

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def response_headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after_seconds))]


class ServerError(RouterError):
    """Our own fault."""


class ConfigError(ServerError):
    error_type = "config_error"


class InternalError(ServerError):
    error_type = "internal_error"


class UpstreamFailure(RouterError):
    """The provider's fault: reported to Sentry and counted by the failure tracker."""

    status = 502
    error_type = "upstream_error"
    openai_type = "upstream_error"
    upstream_failure = True


class UpstreamConnectError(UpstreamFailure):
    error_type = "upstream_connect_error"


class UpstreamDNSError(UpstreamFailure):
    error_type = "upstream_dns_error"


class UpstreamTLSError(UpstreamFailure):
    error_type = "upstream_tls_error"


class UpstreamProtocolError(UpstreamFailure):
    error_type = "upstream_protocol_error"


class UpstreamStreamCut(UpstreamFailure):
    """The upstream cut its body mid-way, after the client had the status and headers.

    The client sees an incomplete response (no terminating chunk, or short of its
    Content-Length), never a clean end; the status it got stays the logged one."""

    error_type = "upstream_stream_cut"


class UpstreamTimeout(UpstreamFailure):
    status = 504
    error_type = "upstream_timeout"
    anthropic_type = "timeout_error"


class UpstreamServerError(UpstreamFailure):
    """The upstream answered 5xx. The client gets the upstream's own status and body."""

    error_type = "upstream_5xx"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HealthCheckFailed(UpstreamFailure):
    """An active health check's answer was a 5xx. No client request is involved."""

    error_type = "health_check_failed"


class HealthCheckAuth(HealthCheckFailed):
    """The upstream refused the operator's key: a rotated key is an outage too."""

    error_type = "health_check_auth"
