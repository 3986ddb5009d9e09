"""The operator CLI, in-process with Typer's CliRunner and as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from clocks import wait_until
from harness import write_config
from sentry_wire import DSN_SECRET
from typer.testing import CliRunner

from apirouter import __version__
from apirouter.ops.cli import cli

runner = CliRunner()
CLEAN_ENV = {
    name: ""
    for name in (
        "SENTRY_DSN",
        "APIROUTER_SENTRY_MONITOR",
        "DEFAULT_API_KEY",
        "APIROUTER_CLIENT_KEYS",
        "API_ROUTER_CONFIG_PATH",
        "SENTRY_SAMPLE_RATE",
        "RATE_LIMIT_REQUESTS_PER_MINUTE",
        "LOG_FORMAT",
        "NO_COLOR",
    )
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No developer .env or environment variable may leak into these tests."""
    monkeypatch.chdir(tmp_path)
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


def invoke(*args, env=None):
    return runner.invoke(cli, list(args), env=env)


# --- check-config ------------------------------------------------------------------------------


def test_check_config_all_shipped_pass():
    result = invoke("check-config", "--all", "--strict")
    assert result.exit_code == 0, result.output
    assert result.output.count("SUCCESS") == 9  # eight providers and the environment
    assert "\x1b[" not in result.output  # no colour when not a terminal


def test_check_config_reports_every_broken_file_with_paths(tmp_path):
    syntax = tmp_path / "syntax.json"
    syntax.write_text('{\n  "baseUrl": "https://x.example"\n  "port": 1\n}')
    types = write_config(
        tmp_path / "types.json", {"baseUrl": "https://x.example", "port": "80", "headers": []}
    )
    unknown = write_config(tmp_path / "unknown.json", {"baseUrl": "https://x.example", "bogus": 1})
    bad_url = write_config(tmp_path / "url.json", {"baseUrl": "not a url"})
    result = invoke("check-config", str(syntax), str(types), str(unknown), str(bad_url), "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    problems = {
        f["target"]: [(p["path"], p["message"], p.get("line")) for p in f["problems"]]
        for f in document["files"]
    }
    assert problems[str(syntax)] == [("$", "invalid JSON: Expecting ',' delimiter", 3)]
    assert problems[str(types)] == [
        ("$.headers", "must be an object of header names to values, not an array", None),
        ("$.port", "must be a whole number from 1 to 65535", None),
    ]
    assert problems[str(unknown)] == [("$.bogus", "unknown key", None)]
    assert problems[str(bad_url)] == [("$.baseUrl", "must be an http:// or https:// URL", None)]
    assert document["summary"] == {"errors": 5, "warnings": 0, "exit_code": 1}


def test_check_config_human_output_names_file_path_and_hint(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"baseUrl": "https://x.example", "base_url": 1}')
    result = invoke("check-config", str(path))
    assert result.exit_code == 1
    assert f"Checking {path} ... FAILED" in result.output
    assert "$.base_url: unknown key — did you mean 'baseUrl'?" in result.output
    assert "Traceback" not in result.output


def test_check_config_json_schema():
    result = invoke("check-config", "openai", "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert set(document) == {"files", "environment", "summary"}
    [file] = document["files"]
    assert file == {
        "target": "openai",
        "source": "provider 'openai' (shipped)",
        "provider": "openai",
        "passthrough": "on: every /v1/ path no route matches, admin APIs excepted",
        "ok": True,
        "problems": [],
        "health_checks": [],  # which key each health check carries (openai has none)
    }
    assert set(document["environment"]) == {"facts", "problems"}
    assert document["environment"]["facts"]["sentry"] == "off (SENTRY_DSN is not set)"


def test_check_config_warnings_fail_only_with_strict(tmp_path):
    path = write_config(
        tmp_path / "p.json",
        {"baseUrl": "http://api.example.com/v1", "modelMapping": {"same": "same"}},
    )
    env = {"DEFAULT_API_KEY": "sk-operator-secret-key-1234567890"}
    relaxed = invoke("check-config", str(path), env=env)
    assert relaxed.exit_code == 0
    strict = invoke("check-config", str(path), "--strict", "--json", env=env)
    assert strict.exit_code == 3
    paths = {
        p["path"]: p["message"] for f in json.loads(strict.stdout)["files"] for p in f["problems"]
    }
    assert "plain http" in paths["$.baseUrl"]
    assert paths['$.modelMapping["same"]'] == "model is mapped to itself"
    environment = json.loads(strict.stdout)["environment"]["problems"]
    assert environment[0]["path"] == "DEFAULT_API_KEY" and "open relay" in environment[0]["message"]
    assert "sk-operator-secret-key-1234567890" not in strict.output


def test_check_config_environment_errors(tmp_path):
    env = {"SENTRY_SAMPLE_RATE": "abc", "SENTRY_DSN": f"https://{DSN_SECRET}@sentry.example/x"}
    result = invoke("check-config", "qwen", env=env)
    assert result.exit_code == 1
    assert (
        "SENTRY_SAMPLE_RATE: invalid value 'abc': must be a number from 0.0 to 1.0" in result.output
    )
    assert "SENTRY_DSN" in result.output and DSN_SECRET not in result.output


def test_check_config_reads_env_file(tmp_path):
    (tmp_path / "prod.env").write_text("LOG_FORMAT=xml\n")
    result = invoke("check-config", "qwen", "--env-file", str(tmp_path / "prod.env"))
    assert result.exit_code == 1
    assert "LOG_FORMAT" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["check-config", "missing.json"],
        ["check-config", "qwne"],
        ["check-config", "--bogus-option"],
    ],
)
def test_check_config_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"apirouter {__version__}"


# --- test-alert ------------------------------------------------------------------------------


def test_test_alert_accepted_end_to_end(ingest):
    result = invoke("test-alert", "--dsn", ingest.dsn, "--provider", "drill", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    kinds = [d["kind"] for d in report["deliveries"]]
    assert kinds == ["dsn-check"] + ["error"] * 5 + ["alert", "recovery"]
    # after the alert the failing upstream was cooled down and the standby fallback served;
    # the probe after its cooldown went back to it, healed, and closed the breaker
    assert report["cooldown_served_by"].startswith("drill-test-alert-standby/")
    assert report["probe_served_by"].startswith("drill-test-alert/")
    assert all(d["accepted"] and d["status"] == 200 for d in report["deliveries"])
    assert {d["state"] for d in report["deliveries"]} == {"ok"}  # the words /health uses
    assert report["search"] == "alert_type:repeated_upstream_failures provider:drill-test-alert"
    alert = next(e for e in ingest.events if e["tags"].get("alert_type"))
    assert alert["tags"]["provider"] == "drill-test-alert"
    assert alert["tags"]["synthetic"] == "true"
    assert alert["contexts"]["alert"]["count"] == 5
    assert DSN_SECRET not in result.output
    assert DSN_SECRET.encode() not in ingest.raw_bytes()  # e.g. through sys.argv
    assert b"test-alert-synthetic-key" not in ingest.raw_bytes()


def test_test_alert_human_output_and_503_mode(ingest):
    result = invoke("test-alert", "--dsn", ingest.dsn, "--mode", "503", "--failures", "5")
    assert result.exit_code == 0, result.output
    assert "1. DSN check: accepted (event id" in result.output
    assert "4. Cooldown: the failing upstream was skipped" in result.output
    assert "the recovery notice was raised" in result.output
    assert "SUCCESS: the alert and the recovery notice were accepted by Sentry." in result.output
    assert "provider:qwen-test-alert" in result.output
    errors = [e for e in ingest.events if e["tags"].get("error_type")]
    assert {e["tags"]["error_type"] for e in errors} == {"upstream_5xx"}


def test_test_alert_below_threshold_is_a_failure(ingest):
    result = invoke("test-alert", "--dsn", ingest.dsn, "--failures", "2")
    assert result.exit_code == 1
    assert "no alert was raised" in result.output


@pytest.mark.parametrize(
    ("status", "retry", "words", "state"),
    [
        (401, None, "rejected (HTTP 401)", "rejected"),
        (403, None, "rejected (HTTP 403)", "rejected"),
        (429, "60", "rate limited by Sentry (HTTP 429): retry after 60s", "rate_limited"),
    ],
)
def test_test_alert_server_refusals_exit_1(ingest, status, retry, words, state):
    ingest.status, ingest.retry_after = status, retry
    result = invoke("test-alert", "--dsn", ingest.dsn)
    assert result.exit_code == 1
    assert words in result.output
    assert len(ingest.envelopes) == 1  # the DSN check only: nothing fired after a refusal
    report = json.loads(invoke("test-alert", "--dsn", ingest.dsn, "--json").stdout)
    assert report["deliveries"][0]["state"] == state  # the words /health uses


def test_test_alert_unreachable_dsn(ingest):
    result = invoke("test-alert", "--dsn", "http://key@nonexistent.invalid/1", "--timeout", "3")
    assert result.exit_code == 1
    assert "could not be resolved" in result.output
    report = json.loads(
        invoke("test-alert", "--dsn", "http://key@nonexistent.invalid/1", "--json").stdout
    )
    assert report["deliveries"][0]["state"] == "unreachable"


def test_test_alert_dry_run_opens_no_socket_to_the_dsn_host(ingest):
    connections = []
    sys.addaudithook(
        lambda event, args: connections.append(args[1]) if event == "socket.connect" else None
    )
    result = invoke("test-alert", "--dsn", ingest.dsn, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert ingest.envelopes == []
    assert ingest.server.port not in {a[1] for a in connections if isinstance(a, tuple)}
    report = json.loads(result.stdout)
    kinds = [d["kind"] for d in report["deliveries"]]
    assert report["dry_run"] is True and kinds[-2:] == ["alert", "recovery"]


@pytest.mark.parametrize(
    "args",
    [
        ["test-alert"],
        ["test-alert", "--dsn", "nope"],
        ["test-alert", "--dry-run", "--mode", "explode"],
        ["test-alert", "--dry-run", "--failures", "0"],
    ],
)
def test_test_alert_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_test_alert_uses_sentry_dsn_from_environment(ingest):
    result = invoke("test-alert", "--json", env={"SENTRY_DSN": ingest.dsn})
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True


# --- real subprocesses ---------------------------------------------------------------------------


def apirouter(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "apirouter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def test_python_dash_m_and_exit_codes_as_subprocess(tmp_path):
    assert apirouter("--version").stdout.strip() == f"apirouter {__version__}"
    assert apirouter("check-config", "--all").returncode == 0
    assert apirouter("check-config", "nope.json").returncode == 2
    bad = apirouter("serve", env={**os.environ, "SENTRY_SAMPLE_RATE": "1.5"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: SENTRY_SAMPLE_RATE: invalid value '1.5': must be a number from 0.0 to 1.0"
    )
    unknown = apirouter("serve", "qwne")
    assert unknown.returncode == 2  # a name that names nothing is a usage error, as in check-config
    assert "unknown provider 'qwne': did you mean 'qwen'?" in unknown.stderr
    assert "openai" in unknown.stderr
    assert "Traceback" not in unknown.stderr + bad.stderr


@contextmanager
def serving_process(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`apirouter serve ARGS` as a subprocess; killed afterwards if a test left it running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "apirouter", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_starts_answers_and_stops_gracefully_on_sigterm():
    with serving_process("generic", "--port", "0") as process:
        banner = process.stderr.readline()
        assert banner.startswith(f"apirouter {__version__} listening on http://127.0.0.1:")
        url = banner.split("listening on ")[1].strip()
        assert not url.endswith(":8000")  # --port 0 means any free port, not the default
        assert "generic" in process.stderr.readline()
        assert "sentry   off" in process.stderr.readline()
        health = wait_until(lambda: httpx.get(url + "/health", timeout=2).json())
        assert health["provider"] == "generic"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def test_serve_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = apirouter("serve", "--port", str(busy.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr


def test_serve_with_a_dsn_says_so_with_the_secret_masked(ingest):
    with serving_process("--port", "0", env={**os.environ, "SENTRY_DSN": ingest.dsn}) as process:
        lines = [process.stderr.readline() for _ in range(3)]
        assert f"sentry   on: http://***@127.0.0.1:{ingest.server.port}/1" in lines[2]
        assert DSN_SECRET not in "".join(lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0


def test_test_alert_as_subprocess_never_sends_the_dsn_secret(ingest):
    result = apirouter("test-alert", "--dsn", ingest.dsn)  # the DSN is in sys.argv here
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: the alert and the recovery notice were accepted by Sentry." in result.stdout
    assert DSN_SECRET.encode() not in ingest.raw_bytes()
    assert DSN_SECRET not in result.stdout + result.stderr


def test_wsgi_module_builds_the_app_from_the_environment(tmp_path):
    """The same app runs under any WSGI server: here, driven through httpx's WSGI transport."""
    config = write_config(
        tmp_path / "p.json", {"name": "wsgi-prov", "baseUrl": "https://x.example/v1"}
    )
    script = (
        "import httpx; from apirouter.wsgi import application as app; "
        "c = httpx.Client(transport=httpx.WSGITransport(app=app), base_url='http://r'); "
        "print(c.get('/health').json()['provider'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "API_ROUTER_CONFIG_PATH": str(config)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "wsgi-prov"


# --- the operator's papercuts (issue 8) ----------------------------------------------------------


def in_terminal(*args: str) -> str:
    """Run `apirouter ARGS` with a pseudo-terminal as stdout/stderr; return what it drew."""
    import pty

    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(
        [sys.executable, "-m", "apirouter", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    process.wait(timeout=60)
    return b"".join(chunks).decode(errors="replace")


def test_terminal_shows_the_dsn_check_as_its_own_step(ingest):
    """Papercut 3: no 'firing ... 0/5' bar while the DSN is still being checked."""
    ingest.status = 401
    drawn = in_terminal("test-alert", "--dsn", ingest.dsn, "--timeout", "5")
    assert "1. checking the DSN" in drawn
    assert "firing synthetic" not in drawn
    assert "1. DSN check: " in drawn and "rejected (HTTP 401)" in drawn


def test_terminal_shows_the_failures_firing_after_the_check(ingest):
    drawn = in_terminal("test-alert", "--dsn", ingest.dsn, "--timeout", "5")
    assert drawn.index("1. checking the DSN") < drawn.index("2. firing synthetic upstream")
    assert "SUCCESS" in drawn


def test_env_example_copied_to_env_passes_strict(tmp_path):
    """Papercut 4: the README's CI recipe works on the shipped example."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / ".env.example"
    (tmp_path / ".env").write_text(example.read_text())
    result = invoke("check-config", "--strict")
    assert result.exit_code == 0, result.output
    (tmp_path / ".env").write_text("RATE_LIMIT_REQUESTS_PER_MINUTE=0\n")  # really set: warned
    assert invoke("check-config", "--strict").exit_code == 3


def test_a_missing_config_file_is_one_message_and_exit_2_for_serve_and_check_config():
    """Papercut 5."""
    expected = (
        "error: config file '/nope.json' does not exist "
        "(to start one: apirouter show-config generic > /nope.json)"
    )
    serve = apirouter("serve", "--config", "/nope.json")
    check = apirouter("check-config", "/nope.json")
    from_env = apirouter("serve", env={**os.environ, "API_ROUTER_CONFIG_PATH": "/nope.json"})
    for result in (serve, check, from_env):
        assert (result.returncode, result.stderr.strip()) == (2, expected)


def test_test_alert_bad_dsn_says_what_a_dsn_looks_like():
    """Papercut 7."""
    result = invoke("test-alert", "--dsn", "not-a-dsn")
    assert result.exit_code == 2
    assert "Unsupported scheme" not in result.output
    assert "a DSN looks like https://PUBLIC_KEY@o123.ingest.sentry.io/PROJECT_ID" in result.output


@pytest.mark.parametrize("command", ["serve", "check-config", "show-config", "test-alert", None])
def test_help_shows_no_type_labels(command):
    """Papercut 8: flags take no value, and metavars are named, not <list[str]>."""
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0
    for label in ("<bool>", "<list[str]>", "<int range>", "<float range>", "<str>", "<path>"):
        assert label not in result.output


def test_serve_help_examples_are_indented_like_the_others():
    def example_indent(command, example):
        line = next(x for x in invoke(command, "--help").output.splitlines() if example in x)
        return len(line) - len(line.lstrip())

    serve = example_indent("serve", "apirouter serve openai")
    check = example_indent("check-config", "apirouter check-config --all")
    headings = [
        x for x in invoke("serve", "--help").output.splitlines() if x.strip() == "Examples:"
    ]
    assert serve == check > len(headings[0]) - len(headings[0].lstrip())


def test_serve_help_lists_the_environment_variables():
    from apirouter.config.settings import VARIABLES

    output = invoke("serve", "--help", env={"COLUMNS": "200"}).output
    for variable in VARIABLES:
        assert f"{variable.name}={variable.default}  {variable.description}" in output


def test_an_invalid_config_says_so_once(tmp_path):
    """Papercut 9: not 'invalid provider config provider ...'."""
    path = write_config(tmp_path / "bad.json", {"baseUrl": "ftp://x"})
    result = apirouter("serve", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"error: {path} is invalid:"
    assert "$.baseUrl: must be an http:// or https:// URL" in result.stderr


def test_log_level_warning_drops_the_access_lines():
    """Papercut 10: --log-level (and LOG_LEVEL) chooses what the log shows."""
    with serving_process("generic", "--port", "0", "--log-level", "WARNING") as process:
        url = process.stderr.readline().split("listening on ")[1].strip()
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        rest = process.stderr.read()
    assert "apirouter.access" not in rest and " INFO " not in rest
    assert rest.startswith("  provider generic")


def test_log_level_must_be_a_known_level():
    result = invoke("serve", "--log-level", "loud")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    bad = apirouter("serve", env={**os.environ, "LOG_LEVEL": "loud"})
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: LOG_LEVEL: invalid value 'loud': must be one of: debug")


def test_log_level_choices_match_the_settings():
    from apirouter.config.settings import LOG_LEVELS
    from apirouter.ops.cli import LogLevel

    assert tuple(level.value for level in LogLevel) == LOG_LEVELS


def test_show_config_prints_a_sample_to_copy(tmp_path):
    """Papercut 10: `show-config generic > file` is a config check-config accepts."""
    result = invoke("show-config", "generic")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["baseUrl"] == "http://127.0.0.1:8080/v1"
    (tmp_path / "mine.json").write_text(result.stdout)
    assert invoke("check-config", str(tmp_path / "mine.json"), "--strict").exit_code == 0


def test_show_config_unknown_provider_is_a_usage_error():
    result = invoke("show-config", "opnai")
    assert result.exit_code == 2
    assert "unknown provider 'opnai': did you mean 'openai'?" in result.output


def test_show_config_with_a_path_says_what_to_run_instead(tmp_path):
    """Papercut (#23): its hint offered a path it did not accept."""
    path = write_config(tmp_path / "mine.json", {"baseUrl": "https://example.com/v1"})
    result = invoke("show-config", str(path))
    assert result.exit_code == 2
    assert f"to check your file: apirouter check-config {path}" in result.output
    assert "or give the path" not in invoke("show-config", "opnai").output


def test_serve_help_at_80_columns_cuts_nothing():
    """Papercut (#23): APIROUTER_MAX_CONCURRENT was cut to APIROUTER_MAX_CONCURREN…"""
    output = invoke("serve", "--help", env={"COLUMNS": "80"}).output
    assert "…" not in output
    assert "APIROUTER_MAX_CONCURRENT," in output
    assert max(len(line) for line in output.splitlines()) <= 80


def test_client_keys_with_upstream_keys_pass_strict(tmp_path):
    """Papercut (#23): with APIROUTER_CLIENT_KEYS and each upstream's key from apiKeyEnv,
    an empty DEFAULT_API_KEY is correct, not a warning that fails --strict."""
    config = {
        "upstreams": [{"baseUrl": "https://example.com/v1", "apiKeyEnv": "UP_KEY"}],
        # an operator key: the config keeps clients from spending it on every family
        "passthrough": ["vector_stores"],
        "endpoints": {"/v1/models/{model}": {"methods": ["GET"]}},
    }
    path = write_config(tmp_path / "keyed.json", config)
    env = {"APIROUTER_CLIENT_KEYS": "ck", "UP_KEY": "k"}
    result = invoke("check-config", str(path), "--strict", env=env)
    assert result.exit_code == 0, result.output
    keyless = write_config(tmp_path / "keyless.json", {"baseUrl": "https://example.com/v1"})
    result = invoke("check-config", str(keyless), "--strict", env=env)
    assert result.exit_code == 3
    assert "DEFAULT_API_KEY is empty, and upstream example.com has no apiKeyEnv" in result.output


def test_a_monitor_without_a_dsn_is_a_check_config_error():
    result = invoke("check-config", "openai", env={"APIROUTER_SENTRY_MONITOR": "apirouter-prod"})
    assert result.exit_code == 1
    assert "APIROUTER_SENTRY_MONITOR: needs SENTRY_DSN" in result.output


def test_gc_tuning_freezes_what_start_up_built():
    """In a process of its own: it changes the collector for the whole process."""
    code = (
        "import gc; from apirouter.ops import gc_tuning; gc_tuning.tune(); "
        "print(gc.get_freeze_count() > 1000, gc.get_count()[0] < 100)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["True", "True"]
