"""What the deploy/ files say in PromQL: metric names used by an expression, the names a real
/metrics exports, and the command-line tools (promtool) the checks run.

Names are read with a small scanner rather than a PromQL parser: strings, label matchers,
ranges and grouping clauses are blanked out, then every identifier that is neither a
function call nor a keyword is a metric name. The check that follows (``promtool check
rules``) parses the same expressions for real, so the scanner only has to find names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    ]
)
# Prometheus's own series, which no exporter exports.
PROMETHEUS_OWN = frozenset({"up"})
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def require_tool(name: str) -> str:
    """The path of a command-line tool; skip without it, unless scripts/test.sh (which
    installs it) says every tool must be there."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("APIROUTER_TESTS_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is not installed: scripts/test.sh installs it")
        pytest.skip(f"{name} is not installed (scripts/test.sh installs it)")
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    text = re.sub(grouping, " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in KEYWORDS and not _is_number_word(text, match):
            names.add(name)
    return names


def _is_number_word(text: str, match: re.Match[str]) -> bool:
    """``1e3``, ``5m`` (after ``offset``) are not names."""
    return match.start() > 0 and text[match.start() - 1].isdigit()


def fleet_metrics_page(make_router: Callable[..., Any], redis_url: str) -> str:
    """A real /metrics page, of a router in fleet mode (``apirouter_redis_up`` is only
    exported there)."""
    router = make_router(redis_url=redis_url)
    return httpx.get(f"{router.url}/metrics").text


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can carry: each family with its type's suffixes
    (families with no samples yet count: their HELP and TYPE lines are there)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        for suffix in _SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names
