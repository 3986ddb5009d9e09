"""The docs are part of the product: their offline commands run, their names exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from harness import doc_blocks, run_bash

from apirouter.config.provider import load, shipped_providers
from apirouter.config.settings import VARIABLES
from apirouter.observe.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "SENTRY.md"]


OFFLINE_BLOCKS = [(doc.name, block) for doc in DOCS for block in doc_blocks(doc, "bash")]


def test_docs_have_offline_command_blocks():
    assert len(OFFLINE_BLOCKS) >= 2


@pytest.mark.parametrize(("doc", "block"), OFFLINE_BLOCKS)
def test_offline_command_blocks_run_as_written(doc, block, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SENTRY_", "APIROUTER_", "API_ROUTER_", "DEFAULT_API_KEY"))
    }
    result = run_bash(block, tmp_path, env)
    assert result.returncode == 0, f"{doc}:\n{block}\n{result.stdout}{result.stderr}"


def test_metric_names_in_docs_exist():
    metrics = Metrics()
    metrics.track_redis(lambda: True)  # apirouter_redis_up exists in fleet mode only
    exposed = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    exposed |= {family.name for family in metrics.registry.collect()}
    exposed |= {f"{name}_total" for name in exposed}
    for doc in DOCS:
        for name in set(re.findall(r"\bapirouter_[a-z_]+[a-z]", doc.read_text())):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in exposed or base in exposed, f"{doc.name} mentions unknown metric {name}"


def test_environment_variables_in_docs_exist():
    known = {v.name for v in VARIABLES}
    for doc in [*DOCS, ROOT / ".env.example"]:
        for name in set(
            re.findall(r"\b(?:SENTRY|APIROUTER|API_ROUTER|RATE_LIMIT)_[A-Z_]+\b", doc.read_text())
        ):
            assert name in known, f"{doc.name} mentions unknown variable {name}"


def test_readme_provider_table_matches_shipped_configs():
    readme = (ROOT / "README.md").read_text()
    for name in shipped_providers():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert f"`{load(name).base_url}`" in row, name


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(
        line for line in ci.splitlines() if line and not line.startswith(("#", "set", "cd"))
    )
    assert command == "bash scripts/test.sh"
    assert f"```sh\n{command}\n```" in (ROOT / "README.md").read_text()
