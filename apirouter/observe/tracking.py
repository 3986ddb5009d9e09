"""Sentry error tracking: init, per-request capture, alert events, scrubbing.

Rules (DESIGN.md §4), each enforced here:
- Enabled only by a valid ``SENTRY_DSN``; disabled means ``sentry_sdk.init`` is never called.
- Every event is captured inside its own forked isolation scope that carries only that
  request's tags. Nothing is ever set on the shared/global or per-thread scope, so tags
  cannot leak between requests (the older router's defect).
- Alerts bypass ``SENTRY_SAMPLE_RATE`` through ``error_sampler``: a sampled-away alert is a
  missed page.
- Secrets never leave: no default PII (the SDK's default), no local variables, no request
  bodies, an extended recursive denylist, and a ``before_send`` that filters anything that
  looks like a secret.
- A failure already captured is logged with ``extra={"sentry_reported": True}`` and the
  logging integration's copy is dropped, so each failure is reported exactly once.
- Per-request events are capped per (provider, error_type) before they reach the SDK; what
  the cap holds back is counted, and alerts travel a path of their own (``delivery.py``).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import sentry_sdk
import sentry_sdk.crons
from sentry_sdk.integrations.argv import ArgvIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.types import Event, Hint
from sentry_sdk.utils import Dsn

from apirouter.config.provider import ConfigInvalid
from apirouter.config.settings import Settings
from apirouter.errors import ConfigError, InternalError, RouterError
from apirouter.observe import delivery
from apirouter.observe.context import RequestContext
from apirouter.observe.delivery import Delivery, DeliveryStats, RetryPolicy
from apirouter.observe.eventcap import EventCap
from apirouter.state.alerting import Alert, Recovery

# Logging `extra` marking a failure already sent to Sentry: its log line must not be sent again.
ALREADY_CAPTURED = {"sentry_reported": True}
FILTERED = "[Filtered]"
_SECRET_KEY = re.compile(
    r"authorization|api[-_]?key|x-api-key|cookie|secret|password|passwd|token|dsn|credential",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(r"^(bearer|basic)\s+\S+|^sk-[A-Za-z0-9_-]{8,}", re.IGNORECASE)
_USAGE_KEY = re.compile(r"gen_ai\.usage\.[a-z_.]+\Z")
_EXTRA_DENYLIST = ["x-api-key", "api-key", "api_key", "apikey", "x_api_key", "proxy-authorization"]


def masked_dsn(dsn: str) -> str:
    """The DSN with its key(s) masked: safe to print, still tells host and project."""
    parsed = Dsn(dsn)
    return f"{parsed.scheme}://***@{parsed.netloc}{parsed.path}{parsed.project_id}"


OFF = {"state": "off", "last_accepted": None}


def init(
    settings: Settings,
    transport: Any = None,
    *,
    retry: RetryPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Initialise the SDK if a DSN is configured. Call before the server starts threads.

    Without a ``transport`` (test-alert passes its own), events go through the
    ``RouterTransport``: alerts on their own path, losses counted, the last answer kept."""
    if not settings.sentry_dsn:
        return False
    if transport is None:
        state = Delivery(
            DeliveryStats(),
            EventCap(settings.sentry_events_per_minute, clock),
            retry or RetryPolicy(),
            clock,
        )
        transport = state.transport_class()
    sample_rate = settings.sentry_sample_rate
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release,
        sample_rate=sample_rate,
        error_sampler=lambda event, hint: 1.0 if _is_alert(event) else sample_rate,
        # send_default_pii stays at its default (off); passing it is deprecated in newer SDKs.
        include_local_variables=False,
        max_request_body_size="never",
        event_scrubber=EventScrubber(denylist=DEFAULT_DENYLIST + _EXTRA_DENYLIST, recursive=True),
        before_send=before_send,
        before_breadcrumb=lambda crumb, hint: _scrub(crumb),
        # No httpx integration: it would add sentry-trace/baggage headers to upstream calls
        # and URL breadcrumbs. No log breadcrumbs: they would pile up on a thread's scope.
        auto_enabling_integrations=False,
        integrations=[LoggingIntegration(level=None, event_level=logging.ERROR)],
        # sys.argv may hold a DSN (test-alert --dsn) or a config path: never attach it.
        disabled_integrations=[ArgvIntegration()],
        # Trace headers go only where traces.py decides (SENTRY_TRACE_PROPAGATION_TARGETS).
        trace_propagation_targets=[],
        # 0 = off: None keeps the SDK's tracing disabled altogether, not merely sampled at 0.
        traces_sample_rate=settings.sentry_traces_sample_rate or None,
        before_send_transaction=before_send_transaction,
        transport_queue_size=1000,
        transport=transport,
    )
    # The SDK's logger sits at DEBUG and a filter drops every record unless ``debug`` is on:
    # building those records cost a fifth of an unsampled request's tracing. Same output.
    sdk_log = logging.getLogger("sentry_sdk.errors")
    sdk_log.setLevel(logging.DEBUG if sentry_sdk.get_client().options["debug"] else logging.WARNING)
    return True


def _is_alert(event: Event) -> bool:
    return "alert_type" in (event.get("tags") or {})


def before_send(event: Event, hint: Hint) -> Event | None:
    record = hint.get("log_record") if hint else None
    if record is not None and getattr(record, "sentry_reported", False):
        return None  # this failure was captured directly; the log line is its echo
    scrubbed: Event = _scrub(event)
    return scrubbed


def before_send_transaction(event: Event, hint: Hint) -> Event:
    """Transactions carry no bodies or headers; scrub them anyway, like every event. Token
    counts (``gen_ai.usage.input_tokens``...) are what they are for: their names stay."""
    scrubbed: Event = _scrub(event, _USAGE_KEY)
    return scrubbed


def _scrub(value: Any, keep: re.Pattern[str] | None = None) -> Any:
    """Replace every value whose key or content looks like a secret, at any depth; keys
    that ``keep`` matches are judged by their values only."""
    if isinstance(value, dict):
        return {
            k: FILTERED
            if isinstance(k, str) and _SECRET_KEY.search(k) and not (keep and keep.match(k))
            else _scrub(v, keep)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, keep) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return FILTERED
    return value


def request_tags(ctx: RequestContext) -> dict[str, str]:
    return {
        "request_id": ctx.request_id,
        "route": ctx.route,
        "method": ctx.method,
        "provider": ctx.provider,
        "upstream_host": ctx.upstream_host or "none",
        "upstream": ctx.target.upstream.name if ctx.target else "none",
        "attempts": str(len(ctx.attempts) + (1 if ctx.target else 0)),
        "model": ctx.model or "other",
        "client_key": ctx.key_label,
    }


def health(enabled: bool) -> dict[str, Any]:
    """The ``sentry`` object of ``/health``: the server's last answer and last acceptance."""
    report = delivery.current_report() if enabled else None
    return report.health() if report is not None else dict(OFF)


def _admitted(provider: str, error_type: str) -> int | None:
    """Ask the cap; ``None`` = suppressed (counted), else the count to report on this event."""
    current = delivery.current()
    return 0 if current is None else current.cap.admit(provider, error_type)


def capture_failure(ctx: RequestContext, error: RouterError, status: int) -> str | None:
    """Send one event for a failed request, on an isolation scope of its own, unless the
    per-group cap suppresses it (then it is counted, and reported on the group's next event)."""
    suppressed_before = _admitted(ctx.provider, error.error_type)
    if suppressed_before is None:
        return None
    with sentry_sdk.isolation_scope() as scope:
        if ctx.trace is not None:  # same trace id as the request's transaction
            ctx.trace.link(scope)
        scope.set_tags(request_tags(ctx))
        scope.set_tag("error_type", error.error_type)
        if suppressed_before:
            scope.set_tag("suppressed_since_last", str(suppressed_before))
        scope.set_tag("status_code", str(status))
        scope.set_level(error.sentry_level)
        for attempt in ctx.attempts:  # the retried attempts before the one that failed last
            scope.add_breadcrumb(category="upstream.attempt", level="warning", data=attempt)
        scope.set_context(
            "upstream",
            {
                "url": ctx.upstream_url or None,
                "status": ctx.upstream_status,
                "latency_seconds": ctx.upstream_seconds,
                "error": error.message,
            },
        )
        if isinstance(error, InternalError) and error.__cause__ is not None:
            # a bug: Sentry's own stack-trace grouping keeps different bugs apart
            return sentry_sdk.capture_exception(error.__cause__)
        scope.fingerprint = [error.error_type, ctx.provider, ctx.route]
        return sentry_sdk.capture_event(
            {
                "level": error.sentry_level,
                "logger": "apirouter",
                "exception": {
                    "values": [
                        {
                            "type": type(error).__name__,
                            "value": error.message,
                            "module": "apirouter.errors",
                            "mechanism": {"type": "apirouter", "handled": True},
                        }
                    ]
                },
            }
        )


def capture_config_error(problem: ConfigInvalid, provider: str) -> str | None:
    """A config file that failed to reload: the router keeps serving the last good one."""
    with sentry_sdk.isolation_scope() as scope:
        scope.set_tags({"error_type": ConfigError.error_type, "provider": provider})
        scope.set_context(
            "config",
            {
                "source": problem.source,
                "problems": [f"{p.path}: {p.message}" for p in problem.problems[:20]],
            },
        )
        scope.fingerprint = [ConfigError.error_type, provider]
        return sentry_sdk.capture_event(
            {
                "level": "error",
                "logger": "apirouter.config",
                "message": f"Config reload failed, keeping the last good config: {problem.source}",
            }
        )


def _alert_tags(event: Alert | Recovery) -> dict[str, str]:
    """The stable tags one alert rule targets: alert_type, provider, upstream."""
    return {
        "alert_type": event.alert_type,
        "provider": event.provider,
        "upstream": event.upstream,
    }


def capture_alert(alert: Alert) -> str | None:
    """The alert event operators write one rule for: stable tags, one issue per provider."""
    with sentry_sdk.isolation_scope():
        return sentry_sdk.capture_event(
            {
                "level": "error",
                "logger": "apirouter.alerts",
                "message": (
                    f"Repeated upstream failures for provider {alert.provider} (upstream "
                    f"{alert.upstream}): {alert.count} failed requests in the last "
                    f"{alert.window_seconds:g}s (threshold {alert.threshold})"
                    + (f"; models: {', '.join(alert.models)}" if alert.models else "")
                ),
                "tags": {**_alert_tags(alert), "models": ",".join(alert.models) or "none"},
                "fingerprint": [
                    "apirouter-alert",
                    alert.alert_type,
                    alert.provider,
                    alert.upstream,
                ],
                "contexts": {
                    "alert": {
                        "count": alert.count,
                        "threshold": alert.threshold,
                        "window_seconds": alert.window_seconds,
                        "last_error_type": alert.last_error_type,
                        "last_status": alert.last_status,
                        "sample_request_ids": list(alert.sample_request_ids),
                        "models": list(alert.models),
                    }
                },
            }
        )


def capture_check_in(slug: str, minutes: int, on_result: Callable[[str], None]) -> bool:
    """One cron check-in (status ok) for the monitor ``slug``, upserting its config: an
    interval schedule of ``minutes`` and a margin of as many, since a fleet's check-ins
    can be up to two intervals apart. It travels with the alerts (``delivery.AlertSender``)
    and ``on_result`` hears Sentry's answer. ``False``: Sentry is off, nothing was sent."""
    current = delivery.current()
    if current is None:
        return False
    check_in_id = uuid.uuid4().hex
    current.expect_check_in(check_in_id, on_result)
    sent = sentry_sdk.crons.capture_checkin(
        monitor_slug=slug,
        check_in_id=check_in_id,
        status=sentry_sdk.crons.MonitorStatus.OK,
        monitor_config={
            "schedule": {"type": "interval", "value": minutes, "unit": "minute"},
            "checkin_margin": minutes,
            "failure_issue_threshold": 1,
            "recovery_threshold": 1,
        },
    )
    if sent is None:  # dropped before the transport: nobody will answer
        current.check_in_listener(check_in_id)
    return sent is not None


def capture_recovery(recovery: Recovery) -> str | None:
    with sentry_sdk.isolation_scope():
        return sentry_sdk.capture_event(
            {
                "level": "info",
                "logger": "apirouter.alerts",
                "message": (
                    f"Upstream recovered for provider {recovery.provider} "
                    f"(upstream {recovery.upstream})"
                ),
                "tags": _alert_tags(recovery),
                "fingerprint": [
                    "apirouter-alert",
                    recovery.alert_type,
                    recovery.provider,
                    recovery.upstream,
                ],
                "contexts": {"recovery": {"failures_since_alert": recovery.failures_since_alert}},
            }
        )


REDIS_UNAVAILABLE = "redis_unavailable"
REDIS_RECOVERED = "redis_recovered"


def capture_redis_unavailable(reason: str) -> str | None:
    """Once per Redis outage per process: it now serves on local state (limits per process).

    Tagged ``alert_type`` so sampling never drops it; one issue for every process."""
    with sentry_sdk.isolation_scope():
        return sentry_sdk.capture_event(
            {
                "level": "error",
                "logger": "apirouter.redis",
                "message": "Redis unavailable: serving on local state (limits per process)",
                "tags": {"alert_type": REDIS_UNAVAILABLE},
                "fingerprint": ["apirouter-alert", REDIS_UNAVAILABLE],
                "contexts": {"redis": {"reason": reason, "pid": os.getpid()}},
            }
        )


def capture_redis_recovered(outage_seconds: float) -> str | None:
    with sentry_sdk.isolation_scope():
        return sentry_sdk.capture_event(
            {
                "level": "info",
                "logger": "apirouter.redis",
                "message": "Redis available again: state is shared across the fleet",
                "tags": {"alert_type": REDIS_RECOVERED},
                "fingerprint": ["apirouter-alert", REDIS_RECOVERED],
                "contexts": {
                    "redis": {"outage_seconds": round(outage_seconds, 3), "pid": os.getpid()}
                },
            }
        )


def flush(timeout: float = 5.0) -> None:
    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=timeout)


def shutdown(timeout: float = 5.0) -> None:
    """Flush pending events and deactivate the SDK (used by tests and on exit)."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=timeout)
    sentry_sdk.get_global_scope().set_client(None)
