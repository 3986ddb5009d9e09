"""Runtime settings, read once from the environment into a frozen dataclass.

The whole environment contract is one table, ``VARIABLES``: name, converter, default, and a
one-line description. ``Settings.from_env(mapping)`` converts every variable and reports
*every* bad value at once (never silently replacing one with a default), so ``serve`` and
``check-config`` agree by construction and tests can pass a plain dict.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from sentry_sdk.utils import BadDsn, Dsn

from apirouter import __version__


class SettingsError(ValueError):
    """One or more environment variables are invalid; ``problems`` lists them all."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems))


DSN_SHAPE = (
    "not a Sentry DSN; a DSN looks like https://PUBLIC_KEY@o123.ingest.sentry.io/PROJECT_ID "
    "(copy it from Sentry: Project Settings > Client Keys (DSN))"
)
LOG_LEVELS = ("debug", "info", "warning", "error")


def _text(value: str) -> str:
    return value.strip()


def _optional_text(value: str) -> str | None:
    return value.strip() or None


def _dsn(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    try:
        Dsn(value)
    except BadDsn:
        # The SDK's own wording ("Unsupported scheme ''") names a parser detail, not the fix.
        raise ValueError(DSN_SHAPE) from None
    return value


def _number(
    kind: Callable[[str], Any], accept: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """A converter: parse with int/float, check the range, explain failures in words."""

    def convert(value: str) -> Any:
        try:
            number = kind(value.strip())
        except ValueError:
            raise ValueError(expected) from None
        if not accept(number):
            raise ValueError(expected)
        return number

    return convert


_fraction = _number(float, lambda n: 0.0 <= n <= 1.0, "must be a number from 0.0 to 1.0")
_positive_int = _number(int, lambda n: n >= 1, "must be a whole number of at least 1")
_non_negative_int = _number(int, lambda n: n >= 0, "must be a whole number of at least 0 (0 = off)")
_positive_seconds = _number(
    float, lambda n: math.isfinite(n) and n > 0, "must be a number of seconds greater than 0"
)
_non_negative_seconds = _number(
    float, lambda n: math.isfinite(n) and n >= 0, "must be a number of seconds of at least 0"
)
_port = _number(int, lambda n: 0 <= n <= 65535, "must be a port number from 0 to 65535")


def _optional_port(value: str) -> int | None:
    return _port(value) if value.strip() else None


def _log_format(value: str) -> str:
    value = value.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return value


def _log_level(value: str) -> str:
    value = value.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of: {', '.join(LOG_LEVELS)}")
    return value


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _redis_url(value: str) -> str | None:
    """Check a Redis URL's syntax offline (no connection): the error never quotes it."""
    value = value.strip()
    if not value:
        return None
    from apirouter.config.redis_url import check  # small and dependency-free: redis is not imported

    check(value)
    return value


def _redis_prefix(value: str) -> str:
    if "{" in value or "}" in value:  # the hash tag must be the first braces in every key
        raise ValueError("must not contain '{' or '}' (they would break Redis Cluster hash tags)")
    return value


def _key_list(value: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in value.split(",") if key.strip())


_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,49}")


def _monitor_slug(value: str) -> str | None:
    """A Sentry cron monitor slug: lowercase letters, digits, ``-`` and ``_``, at most 50."""
    value = value.strip()
    if value and not _SLUG.fullmatch(value):
        raise ValueError(
            "must be a monitor slug: lowercase letters, digits, '-' or '_', at most 50 "
            "characters (e.g. apirouter-prod)"
        )
    return value or None


_MONITOR_WITHOUT_DSN = "needs SENTRY_DSN: the check-ins of the dead man's switch go to Sentry"


def _minutes(value: str) -> float:
    """Whole minutes (Sentry's interval schedules have no seconds), kept in seconds."""
    return 60.0 * int(_positive_int(value))


def _host_patterns(value: str) -> tuple[str, ...]:
    """Comma-separated host names or regular expressions, each checked to compile here so
    a typo stops start-up instead of silently never matching."""
    patterns = _key_list(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return patterns


@dataclass(frozen=True)
class Variable:
    """One environment variable: read by ``Settings.from_env``, documented by its
    description in ``serve --help`` and checked against ``.env.example`` by the tests."""

    name: str
    attribute: str
    convert: Callable[[str], Any]
    default: str
    description: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "API_ROUTER_CONFIG_PATH",
        "config_path",
        _optional_text,
        "",
        "Provider config file to load instead of a shipped provider (hot-reloaded).",
    ),
    Variable(
        "DEFAULT_API_KEY",
        "default_api_key",
        _optional_text,
        "",
        "Upstream API key used when neither the config nor the client supplies one.",
    ),
    Variable(
        "APIROUTER_CLIENT_KEYS",
        "client_keys",
        _key_list,
        "",
        "Comma-separated keys clients must present; when set, client keys are not "
        "forwarded and the upstream key comes from the config or DEFAULT_API_KEY.",
    ),
    Variable("LOG_FORMAT", "log_format", _log_format, "text", "Access log format: text or json."),
    Variable(
        "LOG_LEVEL",
        "log_level",
        _log_level,
        "info",
        "Least severe log level shown: debug, info (one line per request), warning or error.",
    ),
    Variable(
        "RATE_LIMIT_REQUESTS_PER_MINUTE",
        "rate_limit_rpm",
        _non_negative_int,
        "0",
        "Default requests per minute per (route, client key); 0 = no limit.",
    ),
    Variable(
        "RATE_LIMIT_BURST",
        "rate_limit_burst",
        _positive_int,
        "10",
        "Default bucket capacity (burst) for the rate limit above.",
    ),
    Variable(
        "APIROUTER_MAX_BODY_BYTES",
        "max_body_bytes",
        _positive_int,
        str(32 * 1024 * 1024),
        "Largest request body accepted (413 above it).",
    ),
    Variable(
        "APIROUTER_CONNECT_TIMEOUT_SECONDS",
        "connect_timeout",
        _positive_seconds,
        "10",
        "Upstream connect (and connection-pool wait) timeout, seconds.",
    ),
    Variable(
        "APIROUTER_READ_TIMEOUT_SECONDS",
        "read_timeout",
        _positive_seconds,
        "600",
        "Upstream read/write timeout: longest silence tolerated from the upstream, seconds.",
    ),
    Variable(
        "APIROUTER_MAX_CONCURRENT",
        "max_concurrent",
        _positive_int,
        "1024",
        "Proxied requests in flight at once, streaming or not; past it, 503 over_capacity "
        "at once. Sizes the server's threads and connection limit.",
    ),
    Variable(
        "APIROUTER_MAX_CONCURRENT_PER_KEY",
        "max_concurrent_per_key",
        _non_negative_int,
        "0",
        "Proxied requests in flight per client key (anonymous clients share one); 0 = off.",
    ),
    Variable(
        "APIROUTER_HEADER_TIMEOUT_SECONDS",
        "header_timeout",
        _positive_seconds,
        "30",
        "Longest time a request's headers and body may take to arrive (bodies get one extra "
        "second per 64 KB received); slower connections are answered 408 and closed.",
    ),
    Variable(
        "APIROUTER_WRITE_TIMEOUT_SECONDS",
        "write_timeout",
        _positive_seconds,
        "60",
        "Longest time a client may accept no byte of a response waiting to be sent; then "
        "it is disconnected (client_stalled) and its slot, thread and upstream are freed.",
    ),
    Variable(
        "APIROUTER_ADMIN_PORT",
        "admin_port",
        _optional_port,
        "",
        "Also serve /health, /health/ready and /metrics on this port, from their own thread; "
        "empty = off.",
    ),
    Variable(
        "APIROUTER_METRICS_ON_MAIN_PORT",
        "metrics_on_main_port",
        _boolean,
        "1",
        "Serve /metrics on the main port too; 0 = only on the admin port (404 on the main "
        "port; needs APIROUTER_ADMIN_PORT).",
    ),
    Variable(
        "APIROUTER_SHUTDOWN_GRACE_SECONDS",
        "shutdown_grace",
        _non_negative_seconds,
        "10",
        "On SIGTERM, how long requests in flight may take to finish before streams are cut.",
    ),
    Variable(
        "SENTRY_DSN",
        "sentry_dsn",
        _dsn,
        "",
        "Enables Sentry error tracking and alerting; empty = off (no SDK, no network).",
    ),
    Variable(
        "SENTRY_SAMPLE_RATE",
        "sentry_sample_rate",
        _fraction,
        "1.0",
        "Fraction of error events sent, 0.0-1.0 (alerts are never sampled).",
    ),
    Variable(
        "SENTRY_TRACES_SAMPLE_RATE",
        "sentry_traces_sample_rate",
        _fraction,
        "0",
        "Fraction of proxied requests traced for Sentry performance monitoring, 0.0-1.0; "
        "0 = off (no transactions, no cost).",
    ),
    Variable(
        "SENTRY_TRACE_PROPAGATION_TARGETS",
        "sentry_trace_propagation_targets",
        _host_patterns,
        "",
        "Comma-separated upstream hosts (or regular expressions matching the whole host) "
        "that receive sentry-trace/baggage headers on traced requests; empty = none ever do.",
    ),
    Variable(
        "SENTRY_ENVIRONMENT", "sentry_environment", _text, "production", "Sentry environment name."
    ),
    Variable(
        "SENTRY_RELEASE",
        "sentry_release",
        _text,
        f"apirouter@{__version__}",
        "Sentry release name.",
    ),
    Variable(
        "APIROUTER_SENTRY_CLIENT_ERRORS",
        "sentry_client_errors",
        _boolean,
        "false",
        "Also send client errors (4xx we return) to Sentry, at level info.",
    ),
    Variable(
        "APIROUTER_SENTRY_EVENTS_PER_MINUTE",
        "sentry_events_per_minute",
        _positive_int,
        "60",
        "Most per-request Sentry events per (provider, error_type) a minute; the rest are "
        "counted in apirouter_sentry_events_suppressed_total (alerts are never capped).",
    ),
    Variable(
        "APIROUTER_SENTRY_MONITOR",
        "sentry_monitor",
        _monitor_slug,
        "",
        "Sentry cron monitor slug: a check-in at start-up and every interval, so Sentry "
        "alerts when the router stops or can no longer reach it (needs SENTRY_DSN).",
    ),
    Variable(
        "APIROUTER_SENTRY_MONITOR_INTERVAL_MINUTES",
        "sentry_monitor_interval",
        _minutes,
        "1",
        "Minutes between check-ins (whole minutes; in fleet mode, one for the whole fleet).",
    ),
    Variable(
        "APIROUTER_METRICS_PER_KEY",
        "metrics_per_key",
        _boolean,
        "false",
        "Also count tokens per client key (anonymised label, at most 1000 keys, then other).",
    ),
    Variable(
        "APIROUTER_ALERT_THRESHOLD",
        "alert_threshold",
        _positive_int,
        "5",
        "Upstream failures within the window that raise an alert.",
    ),
    Variable(
        "APIROUTER_ALERT_WINDOW_SECONDS",
        "alert_window_seconds",
        _positive_seconds,
        "300",
        "Sliding window for counting upstream failures.",
    ),
    Variable(
        "APIROUTER_ALERT_THROTTLE_SECONDS",
        "alert_throttle_seconds",
        _positive_seconds,
        "60",
        "At most one alert per provider per this many seconds.",
    ),
    Variable(
        "APIROUTER_MAX_PARK_SECONDS",
        "max_park_seconds",
        _positive_seconds,
        "60",
        "Longest time an upstream 429 on an operator key parks that (upstream, model), "
        "whatever its Retry-After says.",
    ),
    Variable(
        "APIROUTER_REDIS_URL",
        "redis_url",
        _redis_url,
        "",
        "Fleet mode: share rate limits, failure windows and the alert throttle through this "
        "Redis (redis://, rediss://, unix://); empty = in-process state. A secret.",
    ),
    Variable(
        "APIROUTER_REDIS_PREFIX",
        "redis_prefix",
        _redis_prefix,
        "apirouter:",
        "Prefix of every Redis key (then the schema version, v1:).",
    ),
    Variable(
        "APIROUTER_REDIS_TIMEOUT_MS",
        "redis_timeout_ms",
        _positive_int,
        "50",
        "Timeout of each Redis call, milliseconds; past it the request uses local state.",
    ),
)


@dataclass(frozen=True)
class Settings:
    config_path: str | None
    default_api_key: str | None
    client_keys: tuple[str, ...]
    log_format: str
    log_level: str
    rate_limit_rpm: int
    rate_limit_burst: int
    max_body_bytes: int
    connect_timeout: float
    read_timeout: float
    max_concurrent: int
    max_concurrent_per_key: int
    header_timeout: float
    write_timeout: float
    admin_port: int | None
    metrics_on_main_port: bool
    shutdown_grace: float
    sentry_dsn: str | None
    sentry_sample_rate: float
    sentry_traces_sample_rate: float
    sentry_trace_propagation_targets: tuple[str, ...]
    sentry_environment: str
    sentry_release: str
    sentry_client_errors: bool
    sentry_events_per_minute: int
    sentry_monitor: str | None
    sentry_monitor_interval: float  # seconds (whole minutes from the environment)
    metrics_per_key: bool
    alert_threshold: int
    alert_window_seconds: float
    alert_throttle_seconds: float
    max_park_seconds: float
    redis_url: str | None
    redis_prefix: str
    redis_timeout_ms: int
    # The whole environment, where an upstream's apiKeyEnv is looked up. Never printed.
    environment: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Convert every variable; raise SettingsError listing every invalid one.

        An empty value counts as unset and takes the default."""
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for variable in VARIABLES:
            raw = env.get(variable.name)
            if raw is None or not raw.strip():  # empty means unset, as in docker/compose
                raw = variable.default
            try:
                values[variable.attribute] = variable.convert(raw)
            except ValueError as exc:
                problems.append((variable.name, f"invalid value {_shown(variable, raw)}: {exc}"))
        dsn_problem = any(name == "SENTRY_DSN" for name, _ in problems)
        if values.get("sentry_monitor") and not values.get("sentry_dsn") and not dsn_problem:
            problems.append(("APIROUTER_SENTRY_MONITOR", _MONITOR_WITHOUT_DSN))
        if problems:
            raise SettingsError(problems)
        return cls(**values, environment=dict(env))

    @classmethod
    def defaults(cls, **overrides: Any) -> Settings:
        """Default settings with some values replaced (used by tests)."""
        return replace(cls.from_env({}), **overrides)


def _shown(variable: Variable, raw: str) -> str:
    """Quote a bad value for an error message without ever printing a secret."""
    if variable.name in (
        "SENTRY_DSN",
        "DEFAULT_API_KEY",
        "APIROUTER_CLIENT_KEYS",
        "APIROUTER_REDIS_URL",
    ):
        return "(hidden)"
    return repr(raw)


def read_environment(env_file: str | Path | None = ".env") -> dict[str, str]:
    """The process environment over the variables of a ``.env`` file, if one exists.

    Real environment variables win, as with docker and systemd: the file only fills gaps.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged
