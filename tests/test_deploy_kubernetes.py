"""deploy/kubernetes: every manifest passes ``kubernetes-validate --strict`` (offline
schemas), and the Deployment says what the README promises: 3 replicas, probes on the admin
port, a preStop pause and a grace period above the router's, a locked-down container, /tmp
as a sized emptyDir, the config from a ConfigMap, keys from a Secret template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deploying import commands
from kube import KUBE, env, find, objects, resources, router_container
from promql import ROOT

from apirouter.config.settings import VARIABLES, Settings

PLACEHOLDERS = {"", "REPLACE_ME"}


def test_every_manifest_passes_strict_validation() -> None:
    """The README's command, as written (this venv's kubernetes-validate first on PATH)."""
    [command] = commands("kubernetes-validate")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(objects()) == 7


def test_kustomization_applies_every_manifest() -> None:
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in resources()} == manifests


def test_the_deployment() -> None:
    deployment = find("Deployment", "apirouter")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]
    container = router_container()
    variables = env(container)
    admin = int(variables["APIROUTER_ADMIN_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "admin": admin}
    for probe, path in [
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/health/ready"),
    ]:
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}, probe
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(admin)
    assert variables["APIROUTER_METRICS_ON_MAIN_PORT"] == "0"
    assert variables["APIROUTER_REDIS_URL"] == "redis://apirouter-redis:6379/0"
    find("Service", "apirouter-redis")
    assert find("PodDisruptionBudget", "apirouter")["spec"]["maxUnavailable"] == 1


def test_shutdown_outlasts_the_routers_grace() -> None:
    container = router_container()
    grace = float(env(container)["APIROUTER_SHUTDOWN_GRACE_SECONDS"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pod = find("Deployment", "apirouter")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + grace


def test_the_container_is_locked_down() -> None:
    pod = find("Deployment", "apirouter")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    security = router_container()["securityContext"]
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_tmp_is_a_sized_empty_dir_above_the_body_limit() -> None:
    container = router_container()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {
        v["name"]: v for v in find("Deployment", "apirouter")["spec"]["template"]["spec"]["volumes"]
    }
    tmp = volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
    assert tmp.endswith("Mi")
    assert int(tmp[:-2]) * 2**20 >= 4 * int(env(container)["APIROUTER_MAX_BODY_BYTES"])
    provider = volumes[mounts["/etc/apirouter"]]
    assert provider["configMap"]["name"] == "apirouter-provider"
    config_path = env(container)["API_ROUTER_CONFIG_PATH"]
    assert config_path == "/etc/apirouter/provider.json"
    assert "provider.json" in find("ConfigMap", "apirouter-provider")["data"]


def test_memory_follows_the_readme_sizing() -> None:
    """70 MB + 100 KB per concurrent stream (README, Capacity), within the limit."""
    container = router_container()
    streams = int(env(container)["APIROUTER_MAX_CONCURRENT"])
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * 2**20 >= 70e6 + streams * 100e3


def test_environment_is_valid_and_known() -> None:
    known = {v.name for v in VARIABLES}
    variables = env(router_container())
    assert set(variables) - known == set()
    secret = find("Secret", "apirouter")["stringData"]
    assert set(secret) - known == set()
    Settings.from_env(variables)


def test_the_secret_is_a_template() -> None:
    secret = find("Secret", "apirouter")
    assert set(secret["stringData"].values()) <= PLACEHOLDERS
    assert "data" not in secret
    refs = [r["secretRef"]["name"] for r in router_container()["envFrom"]]
    assert refs == ["apirouter"]
