"""The ``apirouter`` command: ``serve``, ``check-config``, ``test-alert``.

Thin by design: parse options, call one library function, render with rich, map the result
to an exit code. Exit codes: 0 success; 1 errors found (invalid config, event rejected);
2 usage or configuration error; 3 warnings found under ``check-config --strict``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from apirouter import __version__, diagnostics, firedrill, logs, server, tracking
from apirouter.app import build
from apirouter.config import ConfigInvalid, Problem, load, shipped_providers
from apirouter.settings import Settings, SettingsError, read_environment

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

cli = typer.Typer(
    name="apirouter",
    help="OpenAI-compatible API router for one LLM provider, with Sentry error tracking "
    "and upstream-failure alerting.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

EnvFile = Annotated[
    Path, typer.Option("--env-file", help="Read variables from this file (real env wins).")
]


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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


def load_settings(env_file: Path) -> tuple[Settings, dict[str, str]]:
    env = read_environment(env_file)
    try:
        return Settings.from_env(env), env
    except SettingsError as exc:
        for name, message in exc.problems:
            err.print(f"[red]error:[/red] {name}: {message}", soft_wrap=True)
        raise typer.Exit(2) from None


@cli.command()
def serve(
    provider: Annotated[
        str | None,
        typer.Argument(help=f"Shipped provider: {', '.join(shipped_providers())}. Default qwen."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Provider config file (hot-reloaded).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port (default: the config's, 8000; 0 = any free)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, help="Worker threads (default: max-concurrent + 16).", show_default=False
        ),
    ] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent",
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
            min=0,
            max=65535,
            help="Serve /health, /health/ready, /metrics here on their own thread "
            "(default: APIROUTER_ADMIN_PORT; off).",
            show_default=False,
        ),
    ] = None,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Run the router.

    Examples:

      apirouter serve                      # qwen, on 127.0.0.1:8000

      apirouter serve openai --port 9000

      apirouter serve --config my-provider.json --host 0.0.0.0 --admin-port 9090
    """
    if provider and config:
        raise fail("give a provider name or --config, not both")
    settings, env = load_settings(env_file)
    settings = server.with_options(settings, max_concurrent, admin_port)
    logs.setup(settings.log_format)
    enabled = tracking.init(settings)  # before the server starts its threads
    try:
        application = build(settings, str(config) if config else provider, tracking_enabled=enabled)
    except ConfigInvalid as exc:
        err.print(f"[red]error:[/red] invalid provider config {exc.source}:", soft_wrap=True)
        print_problems(err, exc.problems)
        raise typer.Exit(1) from None
    current = application.store.current
    listen_port = current.port if port is None else port  # --port 0: any free port
    try:
        http_server = server.make_server(application, host, listen_port, threads)
    except OSError as exc:
        reason = exc.strerror or exc
        raise fail(f"cannot listen on {host}:{listen_port}: {reason}", 1) from None
    warnings = diagnostics.lint_environment(settings, env) + diagnostics.lint_config(
        current, settings
    )

    def banner() -> None:
        urls = ", ".join(server.listen_urls(http_server))
        sentry = diagnostics.environment_facts(settings, env)["sentry"]
        err.print(f"apirouter {__version__} listening on {urls}", soft_wrap=True)
        err.print(f"  provider {current.name} -> {current.base_url}", soft_wrap=True)
        err.print(f"  sentry   {sentry}", soft_wrap=True)
        for line in server.banner_lines(http_server):
            err.print(f"  {line}", soft_wrap=True)
        err.print("  metrics at /metrics, health at /health and /health/ready", soft_wrap=True)
        print_problems(err, warnings)

    server.run(http_server, application, on_ready=banner)


@cli.command("check-config")
def check_config(
    targets: Annotated[
        list[str] | None, typer.Argument(help="Shipped provider names or config file paths.")
    ] = None,
    all_shipped: Annotated[
        bool, typer.Option("--all", help="Check every shipped provider.")
    ] = False,
    env_file: EnvFile = Path(".env"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 3 when there are warnings.")
    ] = False,
) -> None:
    """Validate provider configs and the environment, offline (for CI).

    With no target, checks the config serve would use (API_ROUTER_CONFIG_PATH, else qwen).

    Exit codes: 0 valid; 1 errors found; 2 usage error (bad option, file not found);
    3 warnings found with --strict.

    Examples:

      apirouter check-config --all --strict

      apirouter check-config ./my-provider.json --env-file prod.env --json
    """
    env = read_environment(env_file)
    try:
        report = diagnostics.check(list(targets or []), all_shipped, env)
    except diagnostics.UsageError as exc:
        raise fail(str(exc)) from None
    code = report.exit_code(strict)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(strict), indent=2) + "\n")
        raise typer.Exit(code)
    _render_check(report, code)
    raise typer.Exit(code)


@cli.command("test-alert")
def test_alert(
    dsn: Annotated[
        str | None,
        typer.Option(help="Sentry DSN to test (default: SENTRY_DSN).", show_default=False),
    ] = None,
    provider: Annotated[
        str | None,
        typer.Option(
            help="Provider label base; events say <name>-test-alert. "
            "Default: the configured provider."
        ),
    ] = None,
    failures: Annotated[
        int | None,
        typer.Option(
            min=1, max=1000, help="Synthetic failures to fire (default: the alert threshold)."
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="How the synthetic upstream fails: refuse (connections) or 503.")
    ] = "refuse",
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for Sentry per event.")
    ] = 10.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Send nothing; show what would be sent.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
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
    settings, _ = load_settings(env_file)
    if mode not in firedrill.MODES:
        raise fail(f"--mode must be one of: {', '.join(firedrill.MODES)}")
    if dsn is not None:
        try:
            settings = Settings.from_env({**os.environ, "SENTRY_DSN": dsn})
        except SettingsError as exc:
            raise fail(f"--dsn: {dict(exc.problems).get('SENTRY_DSN', exc)}") from None
    if not settings.sentry_dsn and not dry_run:
        raise fail("no DSN: pass --dsn or set SENTRY_DSN (or use --dry-run)")
    label = provider or _configured_provider(settings)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,40}", label):
        raise fail("--provider must be lowercase letters, digits, '.', '_' or '-'")
    count = failures or settings.alert_threshold
    console = err if as_json else out
    with Progress(
        TextColumn("firing synthetic upstream failures"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=as_json or not console.is_terminal,
    ) as bar:
        task = bar.add_task("fire", total=count)
        report = firedrill.run(
            settings,
            settings.sentry_dsn,
            label,
            count,
            mode,
            timeout,
            dry_run,
            progress=lambda: bar.advance(task),
        )
    code = 0 if report.ok else 1
    if as_json:
        sys.stdout.write(json.dumps({**report.to_json(), "exit_code": code}, indent=2) + "\n")
    else:
        _render_drill(report)
    raise typer.Exit(code)


def _configured_provider(settings: Settings) -> str:
    try:
        return load(settings.config_path).name
    except ConfigInvalid:
        return "apirouter"


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
    table = Table("event", "level", "event id", "answer", box=None, pad_edge=False)
    for d in report.deliveries:
        if d.kind != "dsn-check":
            table.add_row(d.kind, d.level, d.event_id[:12], d.answer)
    out.print("3. Delivery:")
    out.print(table)
    if report.alert is None:
        out.print(
            f"[red]FAILED[/red]: no alert was raised ({report.failures} failure(s); "
            f"the threshold is {report.threshold})."
        )
    elif report.ok:
        verdict = "would be sent" if report.dry_run else "was accepted by Sentry"
        out.print(f"[green]SUCCESS[/green]: the alert {verdict}.", soft_wrap=True)
    else:
        out.print("[red]FAILED[/red]: not every event was accepted (see above).")
    out.print(f"In Sentry, search: {report.search}", soft_wrap=True)
    if report.link:
        out.print(f"Issues: {report.link}", soft_wrap=True)


def _render_check(report: diagnostics.CheckReport, code: int) -> None:
    for file in report.files:
        verdict = "[green]SUCCESS[/green]" if file.ok else "[red]FAILED[/red]"
        out.print(f"Checking {file.source} ... {verdict}", soft_wrap=True)
        print_problems(out, file.problems)
    verdict = (
        "[red]FAILED[/red]"
        if any(p.severity == "error" for p in report.environment)
        else "[green]SUCCESS[/green]"
    )
    out.print(f"Checking environment ... {verdict}")
    for name, value in report.facts.items():
        out.print(f"  {name}: {value}", soft_wrap=True)
    print_problems(out, report.environment)
    summary = f"{report.errors} error(s), {report.warnings} warning(s)"
    out.print(("[red]" if code else "[green]") + summary + ("[/red]" if code else "[/green]"))


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
