"""deploy/grafana/apirouter.json: every panel query is valid PromQL (each checked as a
recording rule by ``promtool check rules``, with Grafana's variables filled in) and reads
only metrics a real /metrics exports; the dashboard shows what operators need."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Router
from promql import ROOT, exported_names, fleet_metrics_page, metric_names, promtool

DASHBOARD = ROOT / "deploy" / "grafana" / "apirouter.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": "apirouter"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            found.append(expr)
    return found


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.fixture
def fleet_metrics(make_router: Callable[..., Router], redis_url: str) -> str:
    return fleet_metrics_page(make_router, redis_url)


def test_queries_read_only_exported_metrics(fleet_metrics: str) -> None:
    used = set().union(*(metric_names(expr) for expr in queries()))
    assert used - exported_names(fleet_metrics) == set()


def test_the_dashboard_shows_what_operators_need() -> None:
    used = set().union(*(metric_names(expr) for expr in queries()))
    assert used >= {
        "apirouter_requests_total",  # traffic and errors by route and status
        "apirouter_upstream_errors_total",
        "apirouter_time_to_first_byte_seconds_bucket",  # p50 and p95
        "apirouter_tokens_total",  # by model
        "apirouter_streams_in_flight",  # streams and capacity in use, refusals
        "apirouter_capacity_limit",
        "apirouter_requests_refused_total",
        "apirouter_upstream_state",  # upstream state, cooling scopes
        "apirouter_can_serve",
        "apirouter_sentry_state",  # Sentry delivery, suppressed and dropped events
        "apirouter_sentry_events_suppressed_total",
        "apirouter_sentry_events_dropped_total",
        "apirouter_redis_up",  # Redis
    }
