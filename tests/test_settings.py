"""Environment settings: every bad value reported, none silently replaced."""

from __future__ import annotations

import pytest

from apirouter import __version__
from apirouter.config.settings import VARIABLES, Settings, SettingsError, read_environment


def test_defaults():
    settings = Settings.from_env({})
    assert settings.sentry_dsn is None
    assert settings.sentry_sample_rate == 1.0
    assert settings.sentry_traces_sample_rate == 0.0  # tracing is opt-in
    assert settings.sentry_trace_propagation_targets == ()  # no trace headers upstream
    assert settings.sentry_environment == "production"
    assert settings.sentry_release == f"apirouter@{__version__}"
    assert (
        settings.alert_threshold,
        settings.alert_window_seconds,
        settings.alert_throttle_seconds,
    ) == (5, 300.0, 60.0)
    assert settings.log_format == "text"
    assert settings.log_level == "info"
    assert settings.read_timeout == 600.0


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("SENTRY_SAMPLE_RATE", "abc", "from 0.0 to 1.0"),
        ("SENTRY_SAMPLE_RATE", "NaN", "from 0.0 to 1.0"),
        ("SENTRY_SAMPLE_RATE", "1.5", "from 0.0 to 1.0"),
        ("SENTRY_SAMPLE_RATE", "-0.1", "from 0.0 to 1.0"),
        ("SENTRY_TRACES_SAMPLE_RATE", "1.5", "from 0.0 to 1.0"),
        ("SENTRY_TRACES_SAMPLE_RATE", "yes", "from 0.0 to 1.0"),
        ("SENTRY_TRACE_PROPAGATION_TARGETS", "api.example.com, (unclosed", "'(unclosed'"),
        ("SENTRY_DSN", "not-a-dsn", "a DSN looks like https://PUBLIC_KEY@"),
        ("SENTRY_DSN", "https://sentry.example.com/1", "a DSN looks like https://PUBLIC_KEY@"),
        ("APIROUTER_ALERT_THRESHOLD", "-3", "at least 1"),
        ("APIROUTER_ALERT_THRESHOLD", "five", "at least 1"),
        ("APIROUTER_ALERT_WINDOW_SECONDS", "0", "greater than 0"),
        ("APIROUTER_ALERT_THROTTLE_SECONDS", "inf", "greater than 0"),
        ("LOG_FORMAT", "xml", "'text' or 'json'"),
        ("RATE_LIMIT_REQUESTS_PER_MINUTE", "-1", "at least 0"),
        ("APIROUTER_SENTRY_CLIENT_ERRORS", "maybe", "true or false"),
        ("LOG_LEVEL", "verbose", "debug, info, warning, error"),
    ],
)
def test_invalid_values_name_the_variable_and_the_range(name, value, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    [(reported, message)] = info.value.problems
    assert reported == name
    assert words in message


def test_all_problems_at_once_and_secrets_hidden():
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "SENTRY_DSN": "https://sentry.example.com/abc",
                "SENTRY_SAMPLE_RATE": "2",
                "LOG_FORMAT": "yaml",
            }
        )
    assert [name for name, _ in info.value.problems] == [
        "LOG_FORMAT",
        "SENTRY_DSN",
        "SENTRY_SAMPLE_RATE",
    ]
    assert "sentry.example.com" not in str(info.value)  # a DSN value is never echoed


def test_valid_dsn_and_client_keys():
    settings = Settings.from_env(
        {"SENTRY_DSN": "https://abc@o1.ingest.sentry.io/42", "APIROUTER_CLIENT_KEYS": " a, b ,,"}
    )
    assert settings.sentry_dsn == "https://abc@o1.ingest.sentry.io/42"
    assert settings.client_keys == ("a", "b")


def test_env_file_fills_gaps_and_real_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text('export LOG_FORMAT=json\nSENTRY_ENVIRONMENT="staging"\n')
    monkeypatch.setenv("SENTRY_ENVIRONMENT", "from-env")
    merged = read_environment(env_file)
    assert merged["LOG_FORMAT"] == "json"
    assert merged["SENTRY_ENVIRONMENT"] == "from-env"


def test_every_variable_is_documented_in_env_example():
    from pathlib import Path

    example = (Path(__file__).parent.parent / ".env.example").read_text()
    for variable in VARIABLES:
        assert f"{variable.name}=" in example, variable.name


def test_a_bad_dsn_says_what_a_dsn_looks_like_not_what_the_sdk_says():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"SENTRY_DSN": "not-a-dsn"})
    [(_, message)] = info.value.problems
    assert "Unsupported scheme" not in message  # sentry_sdk's BadDsn wording
    assert "Project Settings > Client Keys" in message


def test_trace_propagation_targets_are_a_trimmed_list():
    settings = Settings.from_env(
        {"SENTRY_TRACE_PROPAGATION_TARGETS": " vllm.internal , .*\\.corp\\.example ,"}
    )
    assert settings.sentry_trace_propagation_targets == ("vllm.internal", ".*\\.corp\\.example")


def test_log_level_is_case_insensitive():
    assert Settings.from_env({"LOG_LEVEL": " WARNING "}).log_level == "warning"


def test_env_example_shows_each_variable_with_its_default_and_description():
    """The table in settings.py is the source; .env.example must not drift from it."""
    import re
    from pathlib import Path

    example = (Path(__file__).parent.parent / ".env.example").read_text()
    prose = re.sub(r"\n#\s*", " ", example)  # comments joined across wrapped lines
    for variable in VARIABLES:
        default = "" if variable.name == "SENTRY_RELEASE" else variable.default
        assert f"\n# {variable.name}={default}\n" in example, variable.name
        assert variable.description in prose, variable.name
