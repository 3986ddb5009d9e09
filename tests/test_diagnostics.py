"""check-config's library functions, called directly: reports, targets, facts, samples."""

from __future__ import annotations

import json

import pytest
from harness import write_config

from apirouter.config.provider import DEFAULT_PROVIDER, parse
from apirouter.ops import diagnostics
from apirouter.ops.diagnostics import EXIT_ERRORS, EXIT_OK, EXIT_WARNINGS, UsageError


def paths(problems, severity):
    return [p.path for p in problems if p.severity == severity]


def test_a_file_with_errors_keeps_its_warnings(tmp_path):
    """Papercut 2: fixing the errors must not reveal a second round of problems."""
    path = write_config(
        tmp_path / "p.json",
        {"baseUrl": "http://api.example.com/v1", "modelMapping": {"same": "same"}, "port": "80"},
    )
    [file] = diagnostics.check([str(path)], all_shipped=False, env={}).files
    assert paths(file.problems, "error") == ["$.port"]
    assert paths(file.problems, "warning") == ["$.baseUrl", '$.modelMapping["same"]']
    assert not file.ok


def test_unreadable_json_has_only_its_syntax_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"baseUrl": "http://api.example.com/v1",')
    [file] = diagnostics.check([str(path)], all_shipped=False, env={}).files
    assert [(p.severity, p.path) for p in file.problems] == [("error", "$")]


def test_environment_errors_keep_the_warnings_of_valid_variables():
    env = {"SENTRY_SAMPLE_RATE": "abc", "DEFAULT_API_KEY": "sk-operator-key"}
    report = diagnostics.check(["qwen"], all_shipped=False, env=env)
    assert paths(report.environment, "error") == ["SENTRY_SAMPLE_RATE"]
    assert paths(report.environment, "warning") == ["DEFAULT_API_KEY"]  # open relay
    assert report.exit_code(strict=False) == EXIT_ERRORS


def test_no_target_checks_the_default_provider_or_the_configured_path(tmp_path):
    report = diagnostics.check([], all_shipped=False, env={})
    assert [f.target for f in report.files] == [DEFAULT_PROVIDER]
    path = write_config(tmp_path / "mine.json", {"baseUrl": "https://x.example/v1"})
    report = diagnostics.check([], all_shipped=False, env={"API_ROUTER_CONFIG_PATH": str(path)})
    assert [f.provider for f in report.files] == ["mine"]


def test_exit_codes_for_warnings_depend_on_strict():
    report = diagnostics.check(
        ["openai"], all_shipped=False, env={"RATE_LIMIT_REQUESTS_PER_MINUTE": "0"}
    )
    assert report.warnings == 1
    assert report.exit_code(strict=False) == EXIT_OK
    assert report.exit_code(strict=True) == EXIT_WARNINGS
    assert report.to_json(strict=True)["summary"]["exit_code"] == EXIT_WARNINGS


@pytest.mark.parametrize(
    ("env", "words"),
    [({}, "off (SENTRY_DSN is not set)"), ({"SENTRY_DSN": " "}, "off (SENTRY_DSN is empty)")],
)
def test_sentry_fact_says_not_set_or_empty(env, words):
    """Papercut 6: an unset variable and an empty one are different mistakes."""
    report = diagnostics.check(["qwen"], all_shipped=False, env=env)
    assert report.facts["sentry"] == words


def test_sentry_fact_names_the_traces_sample_rate_only_when_tracing_is_on():
    dsn = "https://public@o1.ingest.sentry.io/2"
    off = diagnostics.check(["qwen"], all_shipped=False, env={"SENTRY_DSN": dsn})
    assert "traces" not in off.facts["sentry"]
    on = diagnostics.check(
        ["qwen"], all_shipped=False, env={"SENTRY_DSN": dsn, "SENTRY_TRACES_SAMPLE_RATE": "0.1"}
    )
    assert on.facts["sentry"].endswith("sample rate 1, traces sample rate 0.1)")


def test_a_missing_file_is_a_usage_error_that_says_how_to_start_one():
    with pytest.raises(UsageError) as info:
        diagnostics.require_target("/nope/provider.json")
    assert str(info.value) == (
        "config file '/nope/provider.json' does not exist "
        "(to start one: apirouter show-config generic > /nope/provider.json)"
    )


def test_an_unknown_provider_gets_a_close_match():
    with pytest.raises(UsageError) as info:
        diagnostics.require_target("opeani")
    assert str(info.value).startswith("unknown provider 'opeani': did you mean 'openai'?")
    with pytest.raises(UsageError) as info:
        diagnostics.require_target("zzzzzz")
    assert "did you mean" not in str(info.value) and "ollama-local" in str(info.value)


def test_shipped_config_is_the_json_of_the_shipped_file():
    text = diagnostics.shipped_config("generic")
    config = parse(text, source="generic")
    assert config.base_url == "http://127.0.0.1:8080/v1"
    assert json.loads(text)["baseUrl"] == config.base_url
    with pytest.raises(UsageError):
        diagnostics.shipped_config("nope")


def test_literal_keys_and_unset_key_variables_are_warned_about():
    from apirouter.config.settings import Settings

    config = parse(
        json.dumps(
            {
                "upstreams": [
                    {"baseUrl": "https://a.example/v1", "apiKeyEnv": "A_KEY"},
                    {"baseUrl": "https://b.example/v1", "apiKeyEnv": "B_KEY"},
                ],
                "headers": {"Authorization": "Bearer sk-literal-0123456789"},
                "endpoints": {
                    "/v1/messages": {"headers": {"x-api-key": "literal"}},
                    "/v1/models/{model}": {"methods": ["GET"]},
                },
                "passthrough": ["files"],
            }
        ),
        source="t",
    )
    settings = Settings.from_env({"A_KEY": "set"})
    problems = diagnostics.lint_config(config, settings)
    assert paths(problems, "warning") == [
        "$.upstreams",  # open relay: operator keys and no client keys
        "$.upstreams",  # B_KEY is not set
        "$.headers.Authorization",
        '$.endpoints["/v1/messages"].headers.x-api-key',
    ]
    assert "open relay" in problems[0].message
    assert "B_KEY" in problems[1].message and "A_KEY" not in problems[1].message
    guarded = Settings.from_env({"A_KEY": "set", "B_KEY": "set", "APIROUTER_CLIENT_KEYS": "ck"})
    assert "open relay" not in " ".join(p.message for p in diagnostics.lint_config(config, guarded))
    assert all("sk-literal" not in p.message + p.hint for p in problems)
