"""deploy/kubernetes under ``podman kube play``: the Deployment, its ConfigMap mounted as the
provider config, run from the image CI built, serves. podman cannot do all of Kubernetes, so
the manifest is adapted the way a local run needs and no more: one replica, the local image,
host ports on loopback, and the Secret's placeholder values as plain variables (podman 4.3
reads Secrets only from its own store). Probes are not checked: podman runs ``httpGet`` probes
with curl inside the image, which has none."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from clocks import wait_until
from harness import free_port
from kube import find, router_container
from test_image import IMAGE, podman

pytestmark = pytest.mark.container


def local_manifest(api_port: int, admin_port: int) -> list[dict[str, Any]]:
    deployment = copy.deepcopy(find("Deployment", "apirouter"))
    deployment["spec"]["replicas"] = 1
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container == router_container()
    container["image"], container["imagePullPolicy"] = IMAGE, "Never"
    secret = find("Secret", "apirouter")["stringData"]
    del container["envFrom"]
    container["env"] += [{"name": k, "value": v} for k, v in secret.items()]
    host_ports = {"http": api_port, "admin": admin_port}
    for port in container["ports"]:
        port.update(hostIP="127.0.0.1", hostPort=host_ports[port["name"]])
    return [find("ConfigMap", "apirouter-provider"), deployment]


@pytest.fixture
def played(tmp_path: Path) -> Iterator[tuple[str, str]]:
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `bash scripts/container.sh build` first")
    api, admin = free_port(), free_port()
    manifest = tmp_path / "apirouter.yaml"
    manifest.write_text(yaml.safe_dump_all(local_manifest(api, admin)))
    play = podman("kube", "play", str(manifest), check=False)
    try:
        assert play.returncode == 0, play.stderr
        yield f"http://127.0.0.1:{api}", f"http://127.0.0.1:{admin}"
    finally:
        podman("kube", "play", "--down", str(manifest), check=False)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_deployment_serves_under_kube_play(played: tuple[str, str]) -> None:
    api, admin = played
    wait_until(lambda: answers(f"{admin}/health"), timeout=30, interval=0.2)
    health = httpx.get(f"{admin}/health").json()
    assert health["provider"] == "openai"  # the ConfigMap's provider.json
    assert health["capacity"]["limit"] == 1024
    assert httpx.get(f"{admin}/health/ready").status_code == 200
    assert "apirouter_capacity_limit 1024.0" in httpx.get(f"{admin}/metrics").text
    # the main port serves; a client without one of the Secret's client keys is refused
    # there, before anything goes upstream
    refused = httpx.post(f"{api}/v1/chat/completions", json={"model": "m", "messages": []})
    assert refused.status_code == 401
