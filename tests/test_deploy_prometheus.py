"""deploy/prometheus: the alerting and recording rules pass ``promtool check rules``, their
unit tests (``promtool test rules``) show each alert fire and resolve, and every metric they
read is one a real router's /metrics exports."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploying import blocks, commands
from harness import Router
from promql import PROMETHEUS_OWN, ROOT, exported_names, fleet_metrics_page, metric_names
from promql import promtool as run_promtool

RULES = ROOT / "deploy" / "prometheus" / "apirouter-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "apirouter-rules.test.yml"
# Added by the upstream-parking work (#20); tolerated until it has landed.
NOT_YET_EXPORTED: frozenset[str] = frozenset()


def rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        yield from group["rules"]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run_promtool(*args, cwd=RULES.parent)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass() -> None:
    """The cases in apirouter-rules.test.yml: the alert path broken when /health's sentry
    state is ``rejected``, and each other alert firing and resolving."""
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_tests_cover_every_alert() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - tested == set()
    assert "ApirouterAlertPathBroken" in alerts


@pytest.fixture
def fleet_metrics(make_router: Callable[..., Router], redis_url: str) -> str:
    return fleet_metrics_page(make_router, redis_url)


def test_rules_read_only_exported_metrics(fleet_metrics: str) -> None:
    exported = exported_names(fleet_metrics)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert "apirouter_sentry_state" in used
    unknown = used - exported - recorded - PROMETHEUS_OWN - NOT_YET_EXPORTED
    assert unknown == set()


def test_state_metrics_follow_health(fleet_metrics: str) -> None:
    """The four state gauges the rules need, with the values /health shows."""
    assert 'apirouter_sentry_state{state="off"} 1.0' in fleet_metrics
    assert 'apirouter_sentry_state{state="rejected"} 0.0' in fleet_metrics
    assert "apirouter_redis_up 1.0" in fleet_metrics
    assert 'apirouter_can_serve{provider="testprov"} 1.0' in fleet_metrics
    assert "apirouter_capacity_limit 1024.0" in fleet_metrics


def test_name_scanner() -> None:
    expr = (
        'sum by (job, le) (rate(a_total{x="b_c"}[5m] offset 1h)) / on(job) group_left '
        'max without (y) (b) > bool 0.5 or up{job="apirouter"} unless 2 * c:rec'
    )
    assert metric_names(expr) == {"a_total", "b", "up", "c:rec"}


def test_the_readme_commands_run_as_written() -> None:
    lines = commands("promtool")
    assert len(lines) == 2
    for line in lines:
        result = run_promtool(*shlex.split(line)[1:], cwd=ROOT)
        assert result.returncode == 0, line + "\n" + result.stdout + result.stderr


def test_the_readme_scrape_config_is_valid(tmp_path: Path) -> None:
    [config] = [block for block in blocks("yaml") if "scrape_configs" in block]
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(RULES, tmp_path / RULES.name)
    result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job_name: apirouter" in config
