"""What ``check-config`` and ``show-config`` do, as plain functions returning result objects.

The validators are the ones ``serve`` uses (``config.load`` and ``Settings.from_env``), so a
passing ``check-config`` means ``serve`` accepts the same inputs. The risk lints here run
at ``serve`` start-up too, as warnings. Offline, except ``connect=True``
(``check-config --connect``), which pings the configured Redis.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from apirouter.config.headers import KEY_HEADERS
from apirouter.config.provider import (
    DEFAULT_PROVIDER,
    ConfigInvalid,
    Problem,
    ProviderConfig,
    load,
    shipped_providers,
)
from apirouter.config.redis_url import masked as masked_redis_url
from apirouter.config.settings import Settings, SettingsError
from apirouter.observe.tracking import masked_dsn
from apirouter.proxy.probes import key_source

# The CLI's exit codes, one meaning each (the commands' --help and the README list them).
EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_WARNINGS = 0, 1, 2, 3


class UsageError(ValueError):
    """The command line names something that does not exist (exit code 2)."""


@dataclass
class FileReport:
    target: str
    source: str
    provider: str | None = None
    problems: list[Problem] = field(default_factory=list)
    health_checks: list[str] = field(default_factory=list)  # which key each one carries
    passthrough: str | None = None  # what passes through, in words (None: not loaded)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


@dataclass(frozen=True)
class RedisCheck:
    """``check-config --connect``: did the configured Redis answer? (URL masked)"""

    url: str | None  # None: APIROUTER_REDIS_URL is empty
    ok: bool
    version: str | None = None
    latency_ms: float | None = None
    error: str | None = None


@dataclass
class CheckReport:
    files: list[FileReport]
    environment: list[Problem]
    facts: dict[str, str]
    redis: RedisCheck | None = None

    def problems(self) -> list[Problem]:
        return [p for f in self.files for p in f.problems] + self.environment

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems())

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems())

    def exit_code(self, *, strict: bool) -> int:
        if self.errors:
            return EXIT_ERRORS
        if strict and self.warnings:
            return EXIT_WARNINGS
        return EXIT_OK

    def to_json(self, *, strict: bool) -> dict[str, Any]:
        def problem(p: Problem) -> dict[str, Any]:
            return {k: v for k, v in vars(p).items() if v not in (None, "")}

        return {
            "files": [
                {
                    "target": f.target,
                    "source": f.source,
                    "provider": f.provider,
                    "passthrough": f.passthrough,
                    "ok": f.ok,
                    "problems": [problem(p) for p in f.problems],
                    "health_checks": f.health_checks,
                }
                for f in self.files
            ],
            "environment": {
                "facts": self.facts,
                "problems": [problem(p) for p in self.environment],
            },
            **({"redis": vars(self.redis)} if self.redis is not None else {}),
            "summary": {
                "errors": self.errors,
                "warnings": self.warnings,
                "exit_code": self.exit_code(strict=strict),
            },
        }


def check(
    targets: list[str],
    *,
    all_shipped: bool,
    env: Mapping[str, str],
    connect: bool = False,
) -> CheckReport:
    """Validate the named configs (or the one serve would use) and the environment;
    with ``connect``, also ping the configured Redis.

    Raises UsageError, before checking anything, when a target names nothing."""
    settings, environment = check_environment(env)
    if all_shipped:
        targets = [*shipped_providers(), *targets]
    if not targets:
        targets = [env.get("API_ROUTER_CONFIG_PATH") or DEFAULT_PROVIDER]
    for target in targets:
        require_target(target)
    files = [check_file(target, settings) for target in targets]
    facts = environment_facts(settings, env)
    redis = connect_redis(settings) if connect and settings is not None else None
    if redis is not None and not redis.ok:
        environment.append(
            Problem(
                "APIROUTER_REDIS_URL",
                f"Redis unreachable: {redis.error}",
                "check the host, port, password and TLS (rediss://); the router would "
                "serve on per-process state",
            )
        )
    return CheckReport(files, environment, facts, redis)


def connect_redis(settings: Settings) -> RedisCheck:
    """Ping the configured Redis; report its version and round-trip latency."""
    if not settings.redis_url:
        return RedisCheck(None, False, error="APIROUTER_REDIS_URL is empty: nothing to connect to")
    from apirouter.state.redis_backend import ping  # imports redis-py: only when asked

    result = ping(settings.redis_url, settings.redis_timeout_ms)
    return RedisCheck(result.url, result.ok, result.version, result.latency_ms, result.error)


def require_target(target: str) -> None:
    """Refuse a provider name or config path that names nothing.

    ``serve`` and ``check-config`` both call this, so a missing file or a mistyped name
    gets the same one-line message and the same exit code (2) from either command."""
    names = shipped_providers()
    if target in names or Path(target).exists():
        return
    if Path(target).suffix == ".json" or "/" in target:
        raise UsageError(
            f"config file '{target}' does not exist "
            f"(to start one: apirouter show-config generic > {target})"
        )
    raise UsageError(unknown_provider(target))


def unknown_provider(name: str, paths: bool = True) -> str:
    """The one-line message for a name that is no shipped provider; ``paths``: whether the
    command also takes the path of a config file (``show-config`` does not)."""
    names = shipped_providers()
    close = difflib.get_close_matches(name.lower(), names, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    message = f"unknown provider '{name}': {guess}shipped providers are {', '.join(names)}"
    return message + ("; or give the path of a config file" if paths else "")


def shipped_config(name: str) -> str:
    """The JSON text of a shipped provider config, as a starting point for your own file
    (``generic`` is the one to copy for any OpenAI-compatible server)."""
    if name not in shipped_providers():
        if Path(name).is_file():
            raise UsageError(
                f"show-config prints shipped provider configs only; to check your file: "
                f"apirouter check-config {name}"
            )
        raise UsageError(unknown_provider(name, paths=False))
    return (resources.files("apirouter.config") / "providers" / f"{name}.json").read_text("utf-8")


def check_file(target: str, settings: Settings | None) -> FileReport:
    shipped = target in shipped_providers()
    source = f"provider '{target}' (shipped)" if shipped else target
    report = FileReport(target, source)
    try:
        config = load(target)
    except ConfigInvalid as exc:
        # Errors first, then the warnings the readable fields still deserve: an operator
        # fixing the errors should not meet a second round of problems afterwards.
        report.problems = [*exc.problems, *_lint_document(_read_document(target))]
        return report
    report.provider = config.name
    report.problems = lint_config(config, settings)
    report.health_checks = health_check_keys(config, settings)
    report.passthrough = describe_passthrough(config)
    return report


def health_check_keys(config: ProviderConfig, settings: Settings | None) -> list[str]:
    """One line per health-checked upstream: which key its probe carries, and so what a
    401 from it means (a refused operator key, or nothing: pass-through has no key)."""
    default_set = settings is not None and bool(settings.default_api_key)
    lines = []
    for provider in (config, *config.fallbacks):
        if provider.health_check is None:
            continue
        for upstream in provider.upstreams:
            source = key_source(provider, upstream, default_set)
            carries = (
                f"carries {source} (401/403: auth failure)"
                if source
                else "carries no key (any answer below 500: up)"
            )
            lines.append(
                f"health check of {provider.name}/{upstream.name} "
                f"(GET {provider.health_check.path}) {carries}"
            )
    return lines


def describe_passthrough(config: ProviderConfig) -> str:
    """Which paths no template matches still go upstream (config ``passthrough``)."""
    if config.passthrough is False:
        return "off: paths no route matches get 404"
    if config.passthrough is True:
        return "on: every /v1/ path no route matches, admin APIs excepted"
    return f"on for: {', '.join(sorted(config.passthrough))}"


def _read_document(target: str) -> Any:
    """The raw JSON of a config that failed validation, or None when it is unreadable."""
    try:
        if target in shipped_providers():
            return json.loads(shipped_config(target))
        return json.loads(Path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return None


def check_environment(env: Mapping[str, str]) -> tuple[Settings | None, list[Problem]]:
    """Every invalid variable, and the warnings for the valid ones (even when some are not)."""
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        problems = [Problem(name, message, _env_hint(name)) for name, message in exc.problems]
        invalid = {name for name, _ in exc.problems}
        valid = Settings.from_env({k: v for k, v in env.items() if k not in invalid})
        return None, problems + lint_environment(valid, env)
    return settings, lint_environment(settings, env)


def _env_hint(name: str) -> str:
    hints = {
        "SENTRY_DSN": "copy it from Sentry: Project Settings > Client Keys (DSN)",
        "SENTRY_SAMPLE_RATE": "e.g. SENTRY_SAMPLE_RATE=1.0",
        "LOG_FORMAT": "LOG_FORMAT=text or LOG_FORMAT=json",
        "LOG_LEVEL": "e.g. LOG_LEVEL=warning to drop the per-request lines",
        "APIROUTER_REDIS_URL": "e.g. redis://:PASSWORD@HOST:6379/0, or rediss:// for TLS",
        "APIROUTER_SENTRY_MONITOR": "a slug such as apirouter-prod, with SENTRY_DSN set",
    }
    return hints.get(name, "see .env.example for the accepted values")


def lint_environment(settings: Settings, env: Mapping[str, str]) -> list[Problem]:
    """Things that work but are risky."""
    problems: list[Problem] = []
    if settings.default_api_key and not settings.client_keys:
        problems.append(
            warning(
                "DEFAULT_API_KEY",
                "open relay: anyone who can reach apirouter spends this key "
                "(no client keys are required)",
                "set APIROUTER_CLIENT_KEYS, or keep apirouter on a private address",
            )
        )
    if env.get("RATE_LIMIT_REQUESTS_PER_MINUTE", "").strip() == "0":
        problems.append(
            warning(
                "RATE_LIMIT_REQUESTS_PER_MINUTE",
                "a rate limit of 0 turns rate limiting off",
                "remove the variable to say so, or set a positive limit",
            )
        )
    problems += _lint_redis(settings)
    if settings.sentry_dsn:
        if settings.sentry_sample_rate == 0:
            problems.append(
                warning(
                    "SENTRY_SAMPLE_RATE",
                    "0 drops every error event (alerts are still sent)",
                    "use a rate above 0 to see individual failures",
                )
            )
        if urlsplit(settings.sentry_dsn).scheme == "http" and not _loopback(settings.sentry_dsn):
            problems.append(
                warning(
                    "SENTRY_DSN",
                    "plain http to a non-loopback host: events travel unencrypted",
                    "use the https:// DSN",
                )
            )
    return problems


def _lint_redis(settings: Settings) -> list[Problem]:
    url = settings.redis_url
    if url and url.startswith("redis://") and "@" in url and not _loopback(url):
        return [
            warning(
                "APIROUTER_REDIS_URL",
                "plain redis:// to a non-loopback host: the password travels unencrypted",
                "use rediss:// (TLS)",
            )
        ]
    return []


def lint_config(config: ProviderConfig, settings: Settings | None) -> list[Problem]:
    """Things in a valid config that work but are risky."""
    problems = _lint_document({"modelMapping": config.model_mapping})
    problems += _lint_operator_keys(config, settings)
    problems += _lint_spendable_operator_key(config, settings)
    problems += _lint_keyless_upstreams(config, settings)
    for provider in (config, *config.fallbacks):
        where = "$" if provider is config else f"$.fallbacks[{provider.name}]"
        for upstream in provider.upstreams:
            problems += _lint_document({"baseUrl": upstream.base_url}, f"{where}.baseUrl")
            problems += _lint_key_variable(upstream.api_key_env, where, settings)
        problems += _lint_literal_keys(provider, where)
    return problems


def _lint_operator_keys(config: ProviderConfig, settings: Settings | None) -> list[Problem]:
    """An upstream with an operator key (apiKeyEnv) serves anyone who can reach apirouter
    when no client keys are required: the open relay DEFAULT_API_KEY is warned about too."""
    if settings is None or settings.client_keys:
        return []
    chain = (config, *config.fallbacks)
    if not any(u.api_key_env for p in chain for u in p.upstreams):
        return []
    return [
        warning(
            "$.upstreams",
            "open relay: upstreams with apiKeyEnv (fallbacks included) spend the operator's "
            "key for anyone who can reach apirouter (no client keys are required)",
            "set APIROUTER_CLIENT_KEYS, or keep apirouter on a private address",
        )
    ]


def _lint_spendable_operator_key(
    config: ProviderConfig, settings: Settings | None
) -> list[Problem]:
    """With an operator key, pass-through of every family lets each client spend it on
    fine-tuning, evals or videos, and DELETE /v1/models/{model} deletes the operator's
    fine-tuned models: said even when client keys are required (every holder can)."""
    if not _supplies_operator_key(config, settings):
        return []
    problems = []
    if config.passthrough is True:
        problems.append(
            warning(
                "$.passthrough",
                "pass-through is on for every API family, so every client can spend the "
                "operator's key on any of them (fine-tuning, evals, videos...)",
                'list the families clients need, e.g. "passthrough": ["vector_stores", '
                '"files", "conversations"], or false',
            )
        )
    models = config.endpoints.get("/v1/models/{model}")
    if models is not None and "DELETE" in models.methods:
        problems.append(
            warning(
                '$.endpoints["/v1/models/{model}"]',
                "DELETE /v1/models/{model} lets every client delete the operator's "
                "fine-tuned models",
                'allow reads only: "endpoints": {"/v1/models/{model}": {"methods": ["GET"]}}',
            )
        )
    return problems


def _supplies_operator_key(config: ProviderConfig, settings: Settings | None) -> bool:
    """Whether the router sends a key of its own: a configured key header, an upstream's
    apiKeyEnv, or DEFAULT_API_KEY."""
    default_set = bool(settings and settings.default_api_key)
    return any(key_source(config, upstream, default_set) for upstream in config.upstreams)


def _lint_keyless_upstreams(config: ProviderConfig, settings: Settings | None) -> list[Problem]:
    """With client keys required, client keys are never forwarded: an upstream needs a key
    of its own (``apiKeyEnv``, or a key header in the config), else ``DEFAULT_API_KEY``.
    Only the configured provider's upstreams can lack one: fallbacks must name apiKeyEnv."""
    if settings is None or not settings.client_keys or settings.default_api_key:
        return []
    keyless = [u.name for u in config.upstreams if key_source(config, u, False) is None]
    if not keyless:
        return []
    return [
        warning(
            "APIROUTER_CLIENT_KEYS",
            f"client keys are required but DEFAULT_API_KEY is empty, and upstream "
            f"{', '.join(keyless)} has no apiKeyEnv: it would get no key",
            "set DEFAULT_API_KEY, or apiKeyEnv on the upstream (or a key header in the config)",
        )
    ]


def _lint_literal_keys(config: ProviderConfig, where: str) -> list[Problem]:
    """Keys belong in the environment: a key in a config file ends up in version control."""
    places = [(f"{where}.headers", config.headers)] + [
        (f'{where}.endpoints["{path}"].headers', endpoint.headers)
        for path, endpoint in config.endpoints.items()
    ]
    return [
        warning(
            f"{path}.{name}",
            "a literal API key in the config file",
            "move it to the environment and name it with apiKeyEnv on the upstream",
        )
        for path, headers in places
        for name, value in headers.items()
        if name.lower() in KEY_HEADERS and value.strip()
    ]


def _lint_key_variable(name: str | None, where: str, settings: Settings | None) -> list[Problem]:
    if name is None or settings is None or settings.environment.get(name):
        return []
    return [
        warning(
            f"{where}.upstreams",
            f"apiKeyEnv names {name}, which is not set here",
            f"set {name} where apirouter runs; without it no key is sent to that upstream",
        )
    ]


def _lint_document(document: Any, base_url_path: str = "$.baseUrl") -> list[Problem]:
    """Config warnings from raw JSON, so a config with errors still gets its warnings."""
    if not isinstance(document, dict):
        return []
    base_url = document.get("baseUrl")
    mapping = document.get("modelMapping")
    problems: list[Problem] = []
    if (
        isinstance(base_url, str)
        and urlsplit(base_url).scheme == "http"
        and not _loopback(base_url)
    ):
        problems.append(
            warning(
                base_url_path,
                "plain http to a non-loopback host: keys and prompts travel unencrypted",
                "use https://",
            )
        )
    for alias, target in mapping.items() if isinstance(mapping, Mapping) else ():
        if alias == target:
            problems.append(
                warning(
                    f'$.modelMapping["{alias}"]',
                    "model is mapped to itself",
                    "remove the entry; unmapped models pass through unchanged",
                )
            )
    return problems


def warning(path: str, message: str, hint: str) -> Problem:
    return Problem(path, message, hint, severity="warning")


def _loopback(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # an unparseable URL in a broken config: not loopback
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def environment_facts(settings: Settings | None, env: Mapping[str, str]) -> dict[str, str]:
    """A summary an operator can read without any secret in it."""
    if settings is None:
        return {}
    sentry = f"off (SENTRY_DSN {_unset('SENTRY_DSN', env)})"
    if settings.sentry_dsn:
        traces = settings.sentry_traces_sample_rate
        sentry = (
            f"on: {masked_dsn(settings.sentry_dsn)} (environment "
            f"{settings.sentry_environment}, sample rate {settings.sentry_sample_rate:g}"
            f"{f', traces sample rate {traces:g}' if traces else ''})"
        )
    return {
        "sentry": sentry,
        "alerting": (
            f"{settings.alert_threshold} failures in {settings.alert_window_seconds:g}s, "
            f"at most one alert per {settings.alert_throttle_seconds:g}s"
        ),
        "default_api_key": "set" if settings.default_api_key else "not set",
        "client_keys": f"{len(settings.client_keys)} configured"
        if settings.client_keys
        else "none",
        "log_format": settings.log_format,
        "log_level": settings.log_level,
        "redis": _redis_fact(settings, env),
    }


def _unset(name: str, env: Mapping[str, str]) -> str:
    """'is empty' and 'is not set' are different mistakes: say which one it is."""
    return "is empty" if name in env else "is not set"


def _redis_fact(settings: Settings, env: Mapping[str, str]) -> str:
    if not settings.redis_url:
        unset = _unset("APIROUTER_REDIS_URL", env)
        return f"off (APIROUTER_REDIS_URL {unset}: limits and alerts are per process)"
    return (
        f"on: {masked_redis_url(settings.redis_url)} (prefix {settings.redis_prefix}v1:, "
        f"timeout {settings.redis_timeout_ms} ms)"
    )
