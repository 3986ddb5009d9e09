#!/usr/bin/env bash
# Install what the tests need into .venv, check lint, formatting and types, then run the
# whole suite: the fast tests, the end-to-end tests against a real Sentry-protocol server
# (Bugsink, installed into its own venv by tests/e2e), the load tests, then the container
# tests. Any lint or type error fails this script before a test runs; pytest's exit code 5
# ("no tests ran") fails it like any error.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fleet tests run a real redis-server and the deploy/ tests Prometheus's promtool
# (Debian's packages); CI runs as root on Debian.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
    apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"
fi
# Tests that need a tool skip without it when run by hand; here a missing tool fails them.
export APIROUTER_TESTS_REQUIRE_TOOLS=1
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
.venv/bin/python -m pytest -m e2e tests/e2e "$@"
# Load tests (1,000 concurrent streams, 1,000 slowloris connections, capacity refusals,
# drain on SIGTERM). Budget: 5 minutes on 2 cores; they take about one.
.venv/bin/python -m pytest -m load tests/load "$@"
# The container image, built as scripts/container.sh builds it (podman, on a Debian base made
# with mmdebstrap and cached in .cache/container), run and stopped; the Kubernetes manifests
# under `podman kube play`. About 3 minutes from nothing, under a minute with the base cached.
bash scripts/container.sh build
.venv/bin/python -m pytest -m container tests/container "$@"
