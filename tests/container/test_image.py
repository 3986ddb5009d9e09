"""The container image as operators run it: built by scripts/container.sh on the local Debian
base, run read-only with a tmpfs /tmp, as a non-root user, its provider config mounted as a
file. It turns healthy, answers /health on the published admin port, relays a chat request
to an upstream on the host's loopback, and on ``podman stop`` drains the request in flight
and exits 0.

Run by scripts/test.sh after ``scripts/container.sh build`` (marker ``container``)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from clocks import wait_until
from deploying import commands
from promql import ROOT, require_tool
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

pytestmark = pytest.mark.container

IMAGE = "localhost/apirouter:test"
SCRIPT = ROOT / "scripts" / "container.sh"
GRACE_SECONDS = 3
HOST_LOOPBACK = "10.0.2.2"  # the host's 127.0.0.1, seen from slirp4netns
COMPLETION = {"id": "c1", "object": "chat.completion", "choices": []}


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env_line = subprocess.run(
        ["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True
    ).stdout
    conf = env_line.strip().split("=", 1)[1]
    return subprocess.run(
        [require_tool("podman"), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": conf},
    )


@dataclass
class Container:
    id: str

    def port(self, inside: int) -> str:
        out = podman("port", self.id, f"{inside}/tcp").stdout.strip()
        return f"http://{out.splitlines()[0]}"

    def inspect(self, template: str) -> str:
        return podman("inspect", self.id, "--format", template).stdout.strip()


def readme_run_command(config: Path) -> list[str]:
    """The README's ``scripts/container.sh run`` command, on free host ports and with this
    test's provider config."""
    [line] = [c for c in commands("bash") if "scripts/container.sh run" in c]
    replaced = {
        "127.0.0.1:8000:8000": "127.0.0.1::8000",
        "127.0.0.1:9090:9090": "127.0.0.1::9090",
        "$PWD/my-provider.json": str(config),
    }
    assert all(old in line for old in replaced)
    for old, new in replaced.items():
        line = line.replace(old, new)
    return shlex.split(line)


def test_the_readme_builds_as_ci_does() -> None:
    assert "bash scripts/container.sh build" in commands("bash")
    assert "\nbash scripts/container.sh build\n" in (ROOT / "scripts" / "test.sh").read_text()


@pytest.fixture
def container(httpserver: HTTPServer, tmp_path: Path) -> Iterator[Container]:
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `bash scripts/container.sh build` first")
    config = tmp_path / "provider.json"
    base = f"http://{HOST_LOOPBACK}:{httpserver.port}/v1"
    config.write_text(json.dumps({"name": "loopback", "baseUrl": base}))
    config.chmod(0o644)
    started = subprocess.run(
        [
            *readme_run_command(config),
            # the upstream is on the host's loopback; a short grace keeps the test short
            "--network=slirp4netns:allow_host_loopback=true",
            f"-e=APIROUTER_SHUTDOWN_GRACE_SECONDS={GRACE_SECONDS}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("DEFAULT_API_KEY", "SENTRY_DSN")},
    )
    assert started.returncode == 0, started.stderr
    box = Container(started.stdout.strip().splitlines()[-1])
    try:
        yield box
    finally:
        print(podman("logs", box.id, check=False).stderr[-3000:])
        podman("rm", "--force", "--time=0", box.id, check=False)


def healthy(box: Container) -> bool:
    """podman schedules no health checks without systemd: run the image's own check."""
    return podman("healthcheck", "run", box.id, check=False).returncode == 0


def test_the_image_serves_drains_and_stops_cleanly(
    container: Container, httpserver: HTTPServer
) -> None:
    wait_until(lambda: healthy(container), timeout=30, interval=0.2)
    admin = container.port(9090)
    health = httpx.get(f"{admin}/health").json()
    assert health["status"] == "ok" and health["provider"] == "loopback"

    # a chat request through the container reaches the host's loopback upstream
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_json(COMPLETION)
    api = container.port(8000)
    reply = httpx.post(f"{api}/v1/chat/completions", json={"model": "m", "messages": []})
    assert reply.status_code == 200 and reply.json() == COMPLETION
    assert reply.headers["X-Apirouter-Upstream"] == "loopback/" + HOST_LOOPBACK

    # no build tools: no compiler, and pip stayed in the build stage
    tools = "command -v pip || command -v pip3 || command -v gcc || command -v cc"
    assert podman("exec", container.id, "sh", "-c", tools, check=False).returncode != 0
    # non-root, read-only root, writable /tmp
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    assert podman("exec", container.id, "id", "-u").stdout.strip() == "10001"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    assert podman("exec", container.id, "touch", "/opt/x", check=False).returncode != 0
    assert podman("exec", container.id, "touch", "/tmp/x").returncode == 0

    # podman stop: the request in flight finishes, then the process exits 0
    arrived, release = threading.Event(), threading.Event()

    def slow(request: Request) -> Response:
        arrived.set()
        release.wait(10)
        return Response(json.dumps(COMPLETION), content_type="application/json")

    httpserver.clear()
    httpserver.expect_request("/v1/chat/completions").respond_with_handler(slow)
    replies: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: replies.append(
            httpx.post(f"{api}/v1/chat/completions", json={"model": "m"}, timeout=20)
        )
    )
    client.start()
    assert arrived.wait(10)
    stop = threading.Thread(
        target=podman, args=("stop", f"--time={GRACE_SECONDS + 5}", container.id)
    )
    stop.start()
    wait_until(lambda: _not_ready(admin), timeout=10, interval=0.05)
    release.set()
    client.join(20)
    stop.join(30)
    assert [r.status_code for r in replies] == [200]
    assert container.inspect("{{.State.Status}}") == "exited"
    assert container.inspect("{{.State.ExitCode}}") == "0"


def _not_ready(admin: str) -> bool:
    try:
        return httpx.get(f"{admin}/health/ready", timeout=2).status_code == 503
    except httpx.HTTPError:
        return False
