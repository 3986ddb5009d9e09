"""The ``apirouter`` command: ``serve``, ``check-config``, ``show-config``, ``test-alert``.

Thin by design: parse options, call one library function, render with rich, map the result
to an exit code (``diagnostics.EXIT_*``): 0 success; 1 errors found (invalid config, event
rejected, cannot listen); 2 usage or configuration error; 3 warnings under
``check-config --strict``. Every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from apirouter import __version__
from apirouter.config.provider import DEFAULT_PROVIDER, ConfigInvalid, Problem, shipped_providers
from apirouter.config.settings import LOG_LEVELS, VARIABLES, SettingsError, read_environment
from apirouter.ops import diagnostics, firedrill, launch
from apirouter.ops.diagnostics import EXIT_ERRORS, EXIT_OK, EXIT_USAGE, UsageError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _plain_flags(params: list[Any]) -> list[Any]:
    """Help without type labels: typer prints ``--json <bool>`` (which reads as if the flag
    took a value) and ``TARGET <list[str]>``. Options and arguments name their metavars."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar:
            param.display_type_rich = lambda ctx: None  # the metavar already says it
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class LogLevel(StrEnum):
    """--log-level's choices: settings.LOG_LEVELS (a test keeps the two equal)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


cli = typer.Typer(
    name="apirouter",
    cls=Group,
    help="OpenAI-compatible API router for one LLM provider, with Sentry error tracking "
    "and upstream-failure alerting.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

EnvFile = Annotated[
    Path,
    typer.Option(
        "--env-file", metavar="FILE", help="Read variables from this file (real env wins)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"apirouter {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """OpenAI-compatible API router for one LLM provider."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def operator_errors() -> Iterator[None]:
    """Turn the library's operator-fixable failures into one-line errors and exit codes."""
    try:
        yield
    except SettingsError as exc:
        for name, message in exc.problems:
            err.print(f"[red]error:[/red] {name}: {message}", soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except UsageError as exc:
        raise fail(str(exc)) from None
    except ConfigInvalid as exc:
        err.print(f"[red]error:[/red] {exc.source} is invalid:", soft_wrap=True)
        print_problems(err, exc.problems)
        raise typer.Exit(EXIT_ERRORS) from None
    except launch.CannotListen as exc:
        raise fail(str(exc), EXIT_ERRORS) from None


def _environment_help() -> str:
    rows = "\n".join(f"  [bold]{v.name}[/bold]={v.default}  {v.description}" for v in VARIABLES)
    return f"[bold]Environment variables[/bold] (also read from --env-file):\n\n{rows}"


@cli.command(cls=Command, epilog=_environment_help())
def serve(
    provider: Annotated[
        str | None,
        typer.Argument(
            metavar="PROVIDER",
            help=f"Shipped provider: {', '.join(shipped_providers())}. "
            f"Default: API_ROUTER_CONFIG_PATH, else {DEFAULT_PROVIDER}.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", metavar="FILE", help="Provider config file (hot-reloaded)."),
    ] = None,
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Port (default: the config's, 8000; 0 = any)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            help="Worker threads (default: max-concurrent + 16); each open stream holds one.",
            show_default=False,
        ),
    ] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent",
            metavar="N",
            min=1,
            help="Proxied requests in flight; past it 503 over_capacity (default: "
            "APIROUTER_MAX_CONCURRENT, 1024).",
            show_default=False,
        ),
    ] = None,
    admin_port: Annotated[
        int | None,
        typer.Option(
            "--admin-port",
            metavar="PORT",
            min=0,
            max=65535,
            help="Serve /health, /health/ready, /metrics here on their own thread "
            "(default: APIROUTER_ADMIN_PORT; off).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(
            # a short metavar: a long one narrows every help column (at 80 columns
            # APIROUTER_MAX_CONCURRENT no longer fitted and was cut)
            metavar="LEVEL",
            case_sensitive=False,
            help=f"Least severe log level shown: {', '.join(LOG_LEVELS)} (default: "
            "LOG_LEVEL, else info).",
            show_default=False,
        ),
    ] = None,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Run the router.

    Exit codes: 0 stopped cleanly (SIGINT/SIGTERM); 1 invalid config or cannot listen;
    2 usage or configuration error (bad option or variable, unknown provider, missing file).

    Examples:

      apirouter serve                      # qwen, on 127.0.0.1:8000

      apirouter serve openai --port 9000 --log-level warning

      apirouter serve --config my-provider.json --host 0.0.0.0 --admin-port 9090
    """
    options = launch.ServeOptions(
        provider=provider,
        config=config,
        host=host,
        port=port,
        threads=threads,
        log_level=log_level.value if log_level else None,
        max_concurrent=max_concurrent,
        admin_port=admin_port,
    )
    with operator_errors():
        launch.serve(read_environment(env_file), options, on_ready=_render_banner)


def _render_banner(banner: launch.Banner) -> None:
    err.print(f"apirouter {banner.version} listening on {', '.join(banner.urls)}", soft_wrap=True)
    err.print(f"  provider {banner.provider} -> {banner.base_url}", soft_wrap=True)
    err.print(f"  sentry   {banner.sentry}", soft_wrap=True)
    err.print(f"  redis    {banner.redis}", soft_wrap=True)
    for line in banner.capacity:
        err.print(f"  {line}", soft_wrap=True)
    err.print("  metrics at /metrics, health at /health and /health/ready", soft_wrap=True)
    print_problems(err, banner.warnings)


@cli.command("check-config", cls=Command)
def check_config(
    targets: Annotated[
        list[str] | None,
        typer.Argument(metavar="[TARGET]...", help="Shipped provider names or config file paths."),
    ] = None,
    all_shipped: Annotated[
        bool, typer.Option("--all", help="Check every shipped provider.")
    ] = False,
    env_file: EnvFile = Path(".env"),
    as_json: AsJson = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 3 when there are warnings.")
    ] = False,
    connect: Annotated[
        bool,
        typer.Option(
            "--connect", help="Also ping APIROUTER_REDIS_URL: version and latency; 1 if down."
        ),
    ] = False,
) -> None:
    """Validate provider configs and the environment, offline (for CI).

    With no target, checks the config serve would use (API_ROUTER_CONFIG_PATH, else qwen).

    Exit codes: 0 valid; 1 errors found (or, with --connect, Redis unreachable);
    2 usage error (bad option, unknown provider, file not found); 3 warnings found
    with --strict.

    Examples:

      apirouter check-config --all --strict

      apirouter check-config ./my-provider.json --env-file prod.env --json

      apirouter check-config --connect      # is the fleet's Redis reachable?
    """
    env = read_environment(env_file)
    with operator_errors():
        report = diagnostics.check(
            list(targets or []), all_shipped=all_shipped, env=env, connect=connect
        )
    code = report.exit_code(strict=strict)
    if as_json:
        _write_json(report.to_json(strict=strict))
    else:
        _render_check(report, code)
    raise typer.Exit(code)


@cli.command("show-config", cls=Command)
def show_config(
    provider: Annotated[
        str,
        typer.Argument(
            metavar="PROVIDER", help=f"Shipped provider: {', '.join(shipped_providers())}."
        ),
    ],
) -> None:
    """Print a shipped provider config (JSON), to copy and edit.

    For any OpenAI-compatible server (llama.cpp, vLLM, LM Studio...), start from generic
    and change baseUrl.

    Exit codes: 0 printed; 2 unknown provider.

    Examples:

      apirouter show-config generic > my-provider.json

      apirouter check-config my-provider.json
    """
    with operator_errors():
        text = diagnostics.shipped_config(provider)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


@cli.command("test-alert", cls=Command)
def test_alert(
    dsn: Annotated[
        str | None,
        typer.Option(metavar="DSN", help="Sentry DSN to test (default: SENTRY_DSN)."),
    ] = None,
    provider: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Provider label base; events say NAME-test-alert. "
            "Default: the configured provider.",
        ),
    ] = None,
    failures: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            max=1000,
            help="Synthetic failures to fire (default: the alert threshold).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            metavar="|".join(firedrill.MODES),
            help="How the synthetic upstream fails: refuse (connections) or 503.",
        ),
    ] = "refuse",
    timeout: Annotated[
        float,
        typer.Option(metavar="SECONDS", min=0.1, help="Seconds to wait for Sentry per event."),
    ] = 10.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Send nothing; show what would be sent.")
    ] = False,
    as_json: AsJson = False,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Prove that alerts reach Sentry: check the DSN, fire synthetic upstream failures
    through the real alert path, and report what Sentry accepted.

    Exit codes: 0 everything accepted; 1 DSN rejected or alert not accepted;
    2 usage or configuration error (no DSN, invalid values).

    Examples:

      apirouter test-alert                        # uses SENTRY_DSN

      apirouter test-alert --dsn https://KEY@o1.ingest.sentry.io/42 --mode 503

      apirouter test-alert --dry-run --json
    """
    options = firedrill.DrillOptions(
        dsn=dsn, provider=provider, failures=failures, mode=mode, timeout=timeout, dry_run=dry_run
    )
    console = err if as_json else out
    with operator_errors(), DrillProgress(console, shown=not as_json) as progress:
        report = firedrill.drill(read_environment(env_file), options, observer=progress)
    code = EXIT_OK if report.ok else EXIT_ERRORS
    if as_json:
        _write_json({**report.to_json(), "exit_code": code})
    else:
        _render_drill(report)
    raise typer.Exit(code)


class _Count(ProgressColumn):
    """``3/5`` for the firing step; nothing for the DSN check, which has no count."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.completed:.0f}/{task.total:.0f}" if task.total else "")


class DrillProgress:
    """The drill's steps in a terminal, each shown while it runs: first the DSN check,
    then the synthetic failures as they fire (nothing at all when not a terminal)."""

    def __init__(self, console: Console, *, shown: bool) -> None:
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _Count(),
            console=console,
            transient=True,
            disable=not (shown and console.is_terminal),
        )
        self._task: Any = None

    def __enter__(self) -> DrillProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def checking_dsn(self) -> None:
        self._task = self._bar.add_task("1. checking the DSN (sending one event)", total=None)
        self._bar.refresh()  # show the step now: the check may take up to --timeout

    def firing(self, total: int) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task("2. firing synthetic upstream failures", total=total)
        self._bar.refresh()

    def fired(self) -> None:
        self._bar.advance(self._task)


def _write_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _render_drill(report: firedrill.DrillReport) -> None:
    dsn = f"{report.dsn} (project {report.project_id})" if report.dsn != "none" else "none"
    dry = " [yellow](dry run: nothing is sent)[/yellow]" if report.dry_run else ""
    out.print(f"Sentry DSN: {dsn}{dry}", soft_wrap=True)
    check = report.dsn_check
    if check is not None:
        colour = "green" if check.accepted or report.dry_run else "red"
        out.print(f"1. DSN check: [{colour}]{check.answer}[/{colour}]", soft_wrap=True)
    if check is not None and not check.accepted and not report.dry_run:
        out.print("[red]FAILED[/red]: the DSN check was not accepted, so no failures were fired.")
        return
    out.print(
        f"2. Fired {report.failures} synthetic upstream failure(s) ({report.mode}) at "
        f"provider {report.provider}; alert threshold {report.threshold}"
    )
    table = Table("event", "level", "event id", "state", "answer", box=None, pad_edge=False)
    for d in report.deliveries:
        if d.kind != "dsn-check":
            table.add_row(d.kind, d.level, d.event_id[:12], d.state or "-", d.answer)
    out.print("3. Delivery:")
    out.print(table)
    if report.cooldown_served_by:
        out.print(
            f"4. Cooldown: the failing upstream was skipped; the next request went to "
            f"{report.cooldown_served_by}",
            soft_wrap=True,
        )
        notice = "raised" if report.recovery is not None else "[red]not raised[/red]"
        out.print(
            f"5. Recovery: healed, then probed after its cooldown; {report.probe_served_by} "
            f"answered and the recovery notice was {notice}",
            soft_wrap=True,
        )
    _render_verdict(report)


def _render_verdict(report: firedrill.DrillReport) -> None:
    if report.alert is None:
        out.print(
            f"[red]FAILED[/red]: no alert was raised ({report.failures} failure(s); "
            f"the threshold is {report.threshold})."
        )
    elif report.recovery is None:
        out.print("[red]FAILED[/red]: the alert was raised but no recovery notice followed.")
    elif report.ok:
        verdict = "would be sent" if report.dry_run else "were accepted by Sentry"
        out.print(
            f"[green]SUCCESS[/green]: the alert and the recovery notice {verdict}.",
            soft_wrap=True,
        )
    else:
        out.print("[red]FAILED[/red]: not every event was accepted (see above).")
    out.print(f"In Sentry, search: {report.search}", soft_wrap=True)
    if report.link:
        out.print(f"Issues: {report.link}", soft_wrap=True)


def _render_check(report: diagnostics.CheckReport, code: int) -> None:
    for file in report.files:
        verdict = "[green]SUCCESS[/green]" if file.ok else "[red]FAILED[/red]"
        out.print(f"Checking {file.source} ... {verdict}", soft_wrap=True)
        if file.passthrough is not None:
            out.print(f"  passthrough: {file.passthrough}", soft_wrap=True)
        print_problems(out, file.problems)
        for line in file.health_checks:
            out.print(f"  {line}", soft_wrap=True)
    verdict = (
        "[red]FAILED[/red]"
        if any(p.severity == "error" for p in report.environment)
        else "[green]SUCCESS[/green]"
    )
    out.print(f"Checking environment ... {verdict}")
    for name, value in report.facts.items():
        out.print(f"  {name}: {value}", soft_wrap=True)
    if report.redis is not None:
        _render_redis(report.redis)
    print_problems(out, report.environment)
    summary = f"{report.errors} error(s), {report.warnings} warning(s)"
    out.print(("[red]" if code else "[green]") + summary + ("[/red]" if code else "[/green]"))


def _render_redis(check: diagnostics.RedisCheck) -> None:
    out.print(f"Connecting to Redis {check.url or '(not configured)'} ... ", end="", soft_wrap=True)
    if check.ok:
        out.print(f"[green]SUCCESS[/green]: Redis {check.version}, {check.latency_ms} ms")
    else:
        out.print("[red]FAILED[/red] (see below)")


def print_problems(console: Console, problems: list[Problem]) -> None:
    for p in problems:
        where = p.path + (f" (line {p.line}, column {p.column})" if p.line else "")
        colour = "red" if p.severity == "error" else "yellow"
        hint = f" [dim]— {p.hint}[/dim]" if p.hint else ""
        console.print(
            f"  [{colour}]{p.severity}[/{colour}] {where}: {p.message}{hint}", soft_wrap=True
        )


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)
