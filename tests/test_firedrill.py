"""test-alert's library, called directly: options resolved, steps reported in order."""

from __future__ import annotations

import httpx
import pytest
from sentry_wire import DSN_SECRET

from apirouter.config.settings import Settings, SettingsError
from apirouter.ops import firedrill
from apirouter.ops.diagnostics import UsageError
from apirouter.ops.firedrill import DrillOptions


class StepLog:
    """A DrillObserver that writes down what it was told."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def checking_dsn(self) -> None:
        self.steps.append("checking_dsn")

    def firing(self, total: int) -> None:
        self.steps.append(f"firing {total}")

    def fired(self) -> None:
        self.steps.append("fired")


def test_dry_run_reports_each_step_in_order_and_raises_the_alert():
    steps = StepLog()
    report = firedrill.drill({}, DrillOptions(dry_run=True, failures=3), observer=steps)
    assert steps.steps == ["checking_dsn", "firing 3", "fired", "fired", "fired"]
    assert report.alert is None  # 3 failures, threshold 5
    report = firedrill.drill({"APIROUTER_ALERT_THRESHOLD": "2"}, DrillOptions(dry_run=True))
    assert report.ok and report.failures == 2 and report.provider == "qwen-test-alert"


def test_a_rejected_dsn_check_fires_nothing(ingest):
    """Papercut 3: the terminal shows the DSN check as its own step, and firing never starts."""
    ingest.status = 401
    steps = StepLog()
    report = firedrill.drill({}, DrillOptions(dsn=ingest.dsn, timeout=5), observer=steps)
    assert steps.steps == ["checking_dsn"]
    assert not report.ok and report.dsn_check is not None
    assert report.dsn_check.answer.startswith("rejected (HTTP 401)")
    assert DSN_SECRET not in report.dsn


@pytest.mark.parametrize(
    ("env", "options", "words"),
    [
        ({}, DrillOptions(), "no DSN: pass --dsn or set SENTRY_DSN"),
        ({}, DrillOptions(dry_run=True, mode="explode"), "--mode must be one of: refuse, 503"),
        ({}, DrillOptions(dry_run=True, provider="Bad Name"), "--provider must be lowercase"),
        ({}, DrillOptions(dry_run=True, provider="a" * 53), "at most 52 characters"),
        ({}, DrillOptions(dsn="not-a-dsn"), "--dsn: invalid value (hidden): not a Sentry DSN"),
    ],
)
def test_options_the_operator_must_fix_are_usage_errors(env, options, words):
    with pytest.raises(UsageError) as info:
        firedrill.drill(env, options)
    assert words in str(info.value)
    assert "Unsupported scheme" not in str(info.value)


def test_invalid_environment_is_reported_as_settings_problems():
    with pytest.raises(SettingsError) as info:
        firedrill.drill({"SENTRY_SAMPLE_RATE": "2"}, DrillOptions(dry_run=True))
    assert [name for name, _ in info.value.problems] == ["SENTRY_SAMPLE_RATE"]


def test_the_label_defaults_to_the_configured_provider(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"name": "mine", "baseUrl": "https://x.example/v1"}')
    settings = Settings.from_env({"API_ROUTER_CONFIG_PATH": str(path)})
    assert firedrill.configured_provider(settings) == "mine"
    broken = Settings.from_env({"API_ROUTER_CONFIG_PATH": str(tmp_path / "missing.json")})
    assert firedrill.configured_provider(broken) == "apirouter"


def test_refused_base_url_refuses_connections():
    with pytest.raises(httpx.ConnectError):
        httpx.get(firedrill.refused_base_url(), timeout=5)
