#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite: the fast tests, then the
# end-to-end tests against a real Sentry-protocol server (Bugsink, installed into its own
# venv by tests/e2e). pytest's exit code 5 ("no tests ran") fails this script like any error.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fleet tests run a real redis-server (Debian's package); CI runs as root on Debian.
command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python -m pytest "$@"
.venv/bin/python -m pytest -m e2e tests/e2e "$@"
