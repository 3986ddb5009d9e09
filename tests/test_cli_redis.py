"""check-config and Redis: the URL's syntax offline, ``--connect`` online, never the secret."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from apirouter.ops.cli import cli

runner = CliRunner()
SECRET = "s3cret-redis-password"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no developer .env
    for name in ("APIROUTER_REDIS_URL", "APIROUTER_REDIS_PREFIX", "SENTRY_DSN", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def check_config(*args: str, url: str | None = None):
    env = {"APIROUTER_REDIS_URL": url} if url is not None else {}
    return runner.invoke(cli, ["check-config", *args], env=env)


def test_a_malformed_url_is_an_error_offline_and_never_printed():
    result = check_config(url=f"redis://:{SECRET}@cache.internal:port/0")
    assert result.exit_code == 1, result.output
    assert "APIROUTER_REDIS_URL" in result.output and "not a valid URL" in result.output
    assert SECRET not in result.output


def test_plain_redis_with_a_password_to_a_remote_host_is_a_warning():
    result = check_config("--strict", url=f"redis://:{SECRET}@cache.internal:6379/0")
    assert result.exit_code == 3, result.output
    assert "use rediss://" in result.output
    assert "redis: on: redis://:***@cache.internal:6379/0 (prefix apirouter:v1:" in result.output
    assert SECRET not in result.output


def test_without_a_url_the_facts_say_per_process_and_whether_unset_or_empty():
    result = check_config()
    assert result.exit_code == 0, result.output
    assert "redis: off (APIROUTER_REDIS_URL is not set: limits and alerts are per process" in (
        result.output
    )
    assert "APIROUTER_REDIS_URL is empty" in check_config(url="").output


def test_connect_reports_version_and_latency(redis_url):
    result = check_config("--connect", url=redis_url)
    assert result.exit_code == 0, result.output
    assert "Connecting to Redis redis://127.0.0.1:" in result.output
    assert "SUCCESS: Redis 7." in result.output and " ms" in result.output


def test_connect_json(redis_url):
    result = check_config("--connect", "--json", url=redis_url)
    assert result.exit_code == 0, result.output
    redis = json.loads(result.stdout)["redis"]
    assert redis["ok"] is True and redis["version"].startswith("7.")
    assert redis["latency_ms"] >= 0


def test_connect_to_nothing_exits_1_without_the_password():
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    result = check_config("--connect", url=url)
    assert result.exit_code == 1, result.output
    assert "Connecting to Redis redis://:***@127.0.0.1:1/0 ... FAILED" in result.output
    assert "APIROUTER_REDIS_URL: Redis unreachable: ConnectionError" in result.output
    assert SECRET not in result.output


def test_connect_without_a_url_exits_1():
    result = check_config("--connect")
    assert result.exit_code == 1, result.output
    assert "nothing to connect to" in result.output


def test_test_alert_in_fleet_mode_raises_one_alert_each_time(redis_url, redis_server, ingest):
    """The drill goes through the shared (Redis) window; a second drill within the
    throttle period still gets its one alert, since each drill has its own keys."""
    for _ in range(2):
        result = runner.invoke(
            cli,
            ["test-alert", "--dsn", ingest.dsn, "--provider", "fleet", "--json"],
            env={"APIROUTER_REDIS_URL": redis_url},
        )
        assert result.exit_code == 0, result.output
        kinds = [d["kind"] for d in json.loads(result.stdout)["deliveries"]]
        assert kinds.count("alert") == 1
    drills = {k.split(b":")[1] for k in redis_server.client().scan_iter(match="apirouter:*")}
    assert len(drills) == 2 and all(d.startswith(b"drill-") for d in drills)
