"""The ``finish`` step: the one place where the outcome of a request is recorded.

Every request ends in exactly one ``Reporter.finish(ctx, outcome)``. Metrics, the access
log line, the Sentry capture and the failure windows all read that same outcome, so they
can never disagree (the older router logged 500 when it had sent 400). Alerts and
recoveries that the failure windows raise go out from here too, three ways, once each:
log line, metric, Sentry event. The app hands the Reporter outcomes and never imports
tracking or logging itself.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from apirouter import errors
from apirouter.config.provider import ConfigInvalid, ProviderConfig
from apirouter.config.settings import Settings
from apirouter.observe import delivery, tracking
from apirouter.observe.context import Outcome, RequestContext
from apirouter.observe.logs import access_log, alert_log
from apirouter.observe.metrics import Metrics
from apirouter.observe.monitor import Monitor
from apirouter.observe.redis_events import RedisEventReporter
from apirouter.state import backends as state
from apirouter.state.alerting import Alert, Failure, Recovery
from apirouter.state.breakers import Breakers, Target
from apirouter.state.scopes import ScopeTable

log = logging.getLogger("apirouter.report")
MAX_KEYS = 1000  # distinct client keys counted per process with APIROUTER_METRICS_PER_KEY
config_log = logging.getLogger("apirouter.config")


class Reporter:
    """Records outcomes; owns the metrics and the failure tracker."""

    def __init__(
        self,
        settings: Settings,
        *,
        tracking_enabled: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracking_enabled = tracking_enabled
        self.sentry_client_errors = settings.sentry_client_errors
        self.clock = clock
        self.metrics = Metrics()
        # Failure windows and buckets: in-process, or shared through Redis (fleet mode).
        events = RedisEventReporter(self.metrics, tracking_enabled)
        self.state = state.build(settings, events, clock=clock)
        if settings.redis_url:
            self.metrics.track_redis(lambda: self.state.health()["state"] == "up")
        self.monitor: Monitor | None = None  # the dead man's switch; run by the server
        if tracking_enabled and settings.sentry_monitor:
            self.monitor = Monitor(
                settings.sentry_monitor, settings.sentry_monitor_interval, self.state.check_ins
            )
        self.metrics.track_sentry_state(lambda: str(self.sentry_health()["state"]))
        self.tracker = self.state.tracker
        scopes = ScopeTable(settings.alert_threshold, settings.alert_window_seconds)
        self.breakers = Breakers(clock, scopes=scopes)
        self.metrics_per_key = settings.metrics_per_key
        self._tokens: dict[str, dict[str, int]] = {}
        self._keys_seen: set[str] = set()
        self._in_flight = 0
        self._lock = threading.Lock()
        self.metrics.in_flight.set_function(lambda: self._in_flight)

    @property
    def in_flight(self) -> int:
        """Requests begun and not yet finished (streams count until their last byte)."""
        return self._in_flight

    def sentry_health(self) -> dict[str, Any]:
        """Is Sentry accepting what we send? (the /health ``sentry`` object, with the dead
        man's switch's last check-in when it is on)"""
        health = tracking.health(self.tracking_enabled)
        if self.monitor is None:
            return health
        report = delivery.current_report()
        return self.monitor.health(health, report.answered_at if report else None)

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Record a request's outcome once. Reporting must never break serving."""
        with self._lock:
            self._in_flight -= 1
        try:
            self._record(ctx, outcome)
        except Exception:
            log.exception("failed to record the outcome of request %s", ctx.request_id)
        if ctx.trace is not None:  # after _record: its error event links to the open span
            ctx.trace.finish(ctx, outcome)

    def _record(self, ctx: RequestContext, outcome: Outcome) -> None:
        elapsed = self.clock() - ctx.start
        error = outcome.error
        metrics = self.metrics
        metrics.requests.labels(
            ctx.route, metrics.method_label(ctx.method), str(outcome.status)
        ).inc()
        metrics.request_duration.labels(ctx.route).observe(elapsed)
        if ctx.upstream_seconds is not None:
            metrics.upstream_duration.labels(ctx.provider).observe(ctx.upstream_seconds)
        try:  # what the upstream sent never costs the log line, Sentry or the window
            self._record_answer(ctx)
        except Exception:
            log.exception("failed to record the answer of request %s", ctx.request_id)
        captured = False
        if error is not None:
            if error.upstream_failure:
                metrics.upstream_errors.labels(ctx.provider, error.error_type).inc()
            elif isinstance(error, errors.ClientStalled):
                pass  # counted by the server: it may disconnect after finish (App.client_stalled)
            elif isinstance(error, errors.ClientDisconnected):
                metrics.client_disconnects.labels(ctx.route, error.error_type).inc()
            if self.tracking_enabled and self._reportable(error):
                tracking.capture_failure(ctx, error, outcome.status)
                captured = True
        self._log_access(ctx, outcome, elapsed, captured)
        if ctx.target is not None:
            self._last_attempt(ctx, error, outcome.status)

    # --- attempts: failure windows, breakers, alerts -------------------------------------

    def _last_attempt(
        self, ctx: RequestContext, error: errors.RouterError | None, status: int
    ) -> None:
        """The outcome of the attempt that answered the client (earlier ones were retried)."""
        assert ctx.target is not None
        target = ctx.target
        upstream_status = ctx.upstream_status
        if error is None and upstream_status is not None and upstream_status >= 500:
            error = errors.UpstreamServerError("", upstream_status)  # e.g. /v1/models' fetch
            status = upstream_status
        if error is not None and error.upstream_failure:
            self._attempted(target, "failed")
            self._upstream_failed(target, _failure(ctx, error, status), _scope(ctx, error))
        elif ctx.upstream_status == 429:
            self._attempted(target, "rate_limited")
            self.breakers.succeeded(target.key)  # it answered: alive, but not a recovery
        elif ctx.upstream_status is not None:
            self._attempted(target, "ok")
            self._upstream_succeeded(target, ctx.scope_model)
        else:  # it never reached the upstream: give back a probe it may have claimed
            self.breakers.release(target.key)

    def attempt_retried(
        self,
        ctx: RequestContext,
        target: Target,
        error: errors.RouterError | None,
        status: int,
        reason: str,
    ) -> None:
        """An attempt that will be retried: counted, and its failure window and breaker told
        before the next attempt is chosen. A 429 (``error`` None) is never a failure."""
        self.metrics.retries.labels(target.provider.name, reason).inc()
        if error is None:
            self._attempted(target, "rate_limited")
            return
        self._attempted(target, "failed")
        self._upstream_failed(target, _failure(ctx, error, status), _scope(ctx, error))

    def probe_succeeded(self, target: Target) -> None:
        self.metrics.health_checks.labels(target.provider.name, target.upstream.name, "ok").inc()
        self._upstream_succeeded(target, None)

    def probe_failed(self, target: Target, error: errors.RouterError, status: int) -> None:
        """A failed health check fills the same window as a failed request would."""
        self.metrics.health_checks.labels(
            target.provider.name, target.upstream.name, error.error_type
        ).inc()
        probe_id = f"health-check-{uuid.uuid4().hex[:12]}"  # each probe is its own request
        self._upstream_failed(target, Failure(error.error_type, status, probe_id), None)

    def fell_back(self, from_provider: str, to_provider: str) -> None:
        self.metrics.fallbacks.labels(from_provider, to_provider).inc()

    def _attempted(self, target: Target, outcome: str) -> None:
        self.metrics.upstream_attempts.labels(
            target.provider.name, target.upstream.name, outcome
        ).inc()

    def _upstream_failed(self, target: Target, failure: Failure, model: str | None = None) -> None:
        """Every failure counts in the upstream's alert window; a model's failure (``model``
        set) cools that model, any other the whole upstream (see ``Breakers``)."""
        alert = self.tracker.record_failure(target.key, failure)
        if model is None:
            self.breakers.upstream_failed(target, failure.error_type)
        else:
            self.breakers.model_failed(target, model, failure.error_type)
        if alert is not None:
            self._alert(alert)

    def _upstream_succeeded(self, target: Target, model: str | None) -> None:
        self.breakers.succeeded(target.key)
        self.breakers.model_succeeded(target.key, model)
        recovery = self.tracker.record_success(target.key)
        if recovery is not None:
            self._recovery(recovery)

    def _record_answer(self, ctx: RequestContext) -> None:
        """Time to first byte, stream duration and tokens: what the relay read on the side."""
        metrics = self.metrics
        if ctx.first_byte_seconds is not None:
            metrics.time_to_first_byte.labels(ctx.provider, ctx.route).observe(
                ctx.first_byte_seconds
            )
        if ctx.stream_seconds is not None:
            metrics.stream_duration.labels(ctx.provider, ctx.route).observe(ctx.stream_seconds)
        usage = ctx.usage
        if usage is None:
            return
        model = ctx.model or "other"  # only names modelMapping chose: a bounded label set
        counts = {"input": usage.input, "cached_input": usage.cached_input, "output": usage.output}
        key_label = self._key_label(ctx.key_label) if self.metrics_per_key else None
        with self._lock:
            totals = self._tokens.setdefault(ctx.provider, dict.fromkeys(counts, 0))
            for kind, count in counts.items():
                totals[kind] += count
        for kind, count in counts.items():
            if count:
                metrics.tokens.labels(ctx.provider, model, kind).inc(count)
                if key_label is not None:
                    metrics.tokens_by_key.labels(key_label, kind).inc(count)

    def _key_label(self, label: str) -> str:
        """The anonymised key, or ``other`` once MAX_KEYS distinct keys have been counted."""
        with self._lock:
            if label in self._keys_seen or len(self._keys_seen) < MAX_KEYS:
                self._keys_seen.add(label)
                return label
        return "other"

    def tokens_since_start(self) -> dict[str, dict[str, int]]:
        """Tokens per provider since this process started (the /health ``tokens`` object)."""
        with self._lock:
            return {provider: dict(totals) for provider, totals in self._tokens.items()}

    def _reportable(self, error: errors.RouterError) -> bool:
        if isinstance(error, errors.ClientError):
            return self.sentry_client_errors
        return error.reported

    def _log_access(
        self, ctx: RequestContext, outcome: Outcome, elapsed: float, captured: bool
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
            "model": ctx.model,
            "input_tokens": ctx.usage.input if ctx.usage else None,
            "output_tokens": ctx.usage.output if ctx.usage else None,
            "ttfb_ms": None
            if ctx.first_byte_seconds is None
            else round(ctx.first_byte_seconds * 1000, 1),
        }
        access_log.log(
            level,
            error.message if error is not None else "request",
            extra=_log_extra(fields, captured),
            exc_info=error.__cause__ if isinstance(error, errors.InternalError) else None,
        )

    def _alert(self, alert: Alert) -> None:
        """An alert goes out three ways, once each: metric, Sentry event, log line."""
        self.metrics.alerts.labels(alert.provider, alert.alert_type).inc()
        if self.tracking_enabled:
            tracking.capture_alert(alert)
        fields = {
            "alert_type": alert.alert_type,
            "provider": alert.provider,
            "upstream": alert.upstream,
            "count": alert.count,
            "window_seconds": alert.window_seconds,
            "threshold": alert.threshold,
            "last_error_type": alert.last_error_type,
            "last_status": alert.last_status,
            "sample_request_ids": ",".join(alert.sample_request_ids),
            "models": ",".join(alert.models),
        }
        alert_log.error(
            "repeated upstream failures", extra=_log_extra(fields, self.tracking_enabled)
        )

    def _recovery(self, recovery: Recovery) -> None:
        self.metrics.alerts.labels(recovery.provider, recovery.alert_type).inc()
        if self.tracking_enabled:
            tracking.capture_recovery(recovery)
        fields = {
            "alert_type": recovery.alert_type,
            "provider": recovery.provider,
            "upstream": recovery.upstream,
            "failures_since_alert": recovery.failures_since_alert,
        }
        alert_log.warning("upstream recovered", extra=_log_extra(fields, False))

    def watch_upstreams(self, config: ProviderConfig) -> None:
        """Export each upstream's breaker state (the configured provider's and fallbacks')."""
        for provider in (config, *config.fallbacks):
            for upstream in provider.upstreams:
                key = Target(provider, upstream).key
                labels = (provider.name, upstream.name)
                self.metrics.upstream_state.labels(*labels).set_function(
                    functools.partial(self._state_of, key)
                )
                self.metrics.upstream_parked.labels(*labels).set_function(
                    functools.partial(self._scopes_of, key, 0)
                )
                self.metrics.upstream_cooling.labels(*labels).set_function(
                    functools.partial(self._scopes_of, key, 1)
                )

    def _state_of(self, key: str) -> float:
        return float(self.breakers.state(key))

    def _scopes_of(self, key: str, kind: int) -> float:
        return float(len(self.breakers.scoped(key)[kind]))  # 0 parked, 1 cooling

    def config_reloaded(self, problem: ConfigInvalid | None, current: ProviderConfig) -> None:
        """Say what a reload did. A bad file never replaces the config that is serving."""
        self.metrics.config_reloads.labels("failure" if problem else "success").inc()
        if problem is None:
            self.watch_upstreams(current)
            config_log.info("config reloaded")
            return
        captured = (
            self.tracking_enabled
            and tracking.capture_config_error(problem, current.name) is not None
        )
        config_log.error(
            "config reload failed, keeping the last good config: %s",
            problem,
            extra=_log_extra({}, captured),
        )


def _failure(ctx: RequestContext, error: errors.RouterError, status: int) -> Failure:
    """One failed request for the alert window; its model as a bounded label."""
    model = ctx.model or ("other" if ctx.scope_model else None)
    return Failure(error.error_type, status, ctx.request_id, model)


def _scope(ctx: RequestContext, error: errors.RouterError) -> str | None:
    """The model a failure belongs to, or None when it is the whole upstream's: only an
    answer (a 5xx, a stream cut or gone silent after the headers) speaks for one model;
    connect, DNS and TLS failures and timeouts before the headers speak for the upstream."""
    if isinstance(error, (errors.UpstreamServerError, errors.UpstreamStreamCut)):
        return ctx.scope_model
    return None


def _log_extra(fields: dict[str, Any], captured: bool) -> dict[str, Any]:
    """Logging ``extra``: structured fields, and the mark that Sentry already has it."""
    extra: dict[str, Any] = {"fields": fields}
    if captured:
        extra.update(tracking.ALREADY_CAPTURED)
    return extra
