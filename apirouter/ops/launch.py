"""Start the router from the operator's options: everything ``apirouter serve`` does.

The order matters. Settings first, so a bad variable stops start-up before anything else;
then the target (a missing file or mistyped name is a usage error, as in ``check-config``);
logs; Sentry, before the server creates its threads (sentry-sdk needs that); the app and
its config; the listening socket; and the banner facts. Every failure an operator can fix
is raised as one exception that the CLI turns into a one-line error and an exit code:
SettingsError and UsageError (2), ConfigInvalid and CannotListen (1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from apirouter import __version__
from apirouter.config.provider import DEFAULT_PROVIDER, Problem
from apirouter.config.settings import Settings
from apirouter.observe import logs, tracking
from apirouter.ops import gc_tuning
from apirouter.ops.diagnostics import (
    UsageError,
    environment_facts,
    lint_config,
    lint_environment,
    require_target,
)
from apirouter.proxy.app import App, build
from apirouter.server import runner as server
from apirouter.server.channel import AnyServer, listen_urls


class CannotListen(OSError):
    """The address or port is not available (in use, not ours, or not an address)."""


@dataclass(frozen=True)
class ServeOptions:
    """The command line of ``apirouter serve``; ``None`` means "from the config/environment"."""

    provider: str | None = None
    config: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = None  # None: the config's port; 0: any free port
    threads: int | None = None  # None: sized for max_concurrent
    log_level: str | None = None  # None: LOG_LEVEL
    max_concurrent: int | None = None  # None: APIROUTER_MAX_CONCURRENT
    admin_port: int | None = None  # None: APIROUTER_ADMIN_PORT


@dataclass(frozen=True)
class Banner:
    """What the start-up lines say: no secret in any of it (the DSN is masked)."""

    version: str
    urls: list[str]
    provider: str
    base_url: str
    sentry: str
    redis: str
    capacity: list[str]  # sizing and the admin listener
    warnings: list[Problem]


def serve(
    env: Mapping[str, str], options: ServeOptions, *, on_ready: Callable[[Banner], None]
) -> None:
    """Start the router and serve until SIGINT/SIGTERM; ``on_ready`` shows the banner."""
    settings = Settings.from_env(env)
    if options.log_level is not None:
        settings = replace(settings, log_level=options.log_level)
    settings = server.with_options(settings, options.max_concurrent, options.admin_port)
    target = resolve_target(options, settings)
    logs.setup(settings.log_format, settings.log_level)
    application = build(settings, target, tracking_enabled=tracking.init(settings))
    http_server = _listen(application, options)
    banner = _banner(application, http_server, settings, env, options)
    gc_tuning.tune()
    server.run(http_server, application, on_ready=lambda: on_ready(banner))


def resolve_target(options: ServeOptions, settings: Settings) -> str:
    """The provider name or config path to load, refused early when it names nothing."""
    if options.provider and options.config:
        raise UsageError("give a provider name or --config, not both")
    if options.config is not None:
        target = str(options.config)
    else:
        target = options.provider or settings.config_path or DEFAULT_PROVIDER
    require_target(target)
    return target


def _listen(application: App, options: ServeOptions) -> AnyServer:
    port = application.store.current.port if options.port is None else options.port
    try:
        return server.make_server(application, options.host, port, options.threads)
    except OSError as exc:
        application.close()
        reason = exc.strerror or exc
        raise CannotListen(f"cannot listen on {options.host}:{port}: {reason}") from None


def _banner(
    application: App,
    http_server: AnyServer,
    settings: Settings,
    env: Mapping[str, str],
    options: ServeOptions,
) -> Banner:
    current = application.store.current
    return Banner(
        version=__version__,
        urls=listen_urls(http_server),
        provider=current.name,
        base_url=current.base_url,
        sentry=environment_facts(settings, env)["sentry"],
        redis=environment_facts(settings, env)["redis"],
        capacity=server.banner_lines(http_server),
        warnings=lint_environment(settings, env) + lint_config(current, settings),
    )
