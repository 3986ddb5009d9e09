"""deploy/kubernetes, read: the manifests kustomization.yaml applies, and their objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from promql import ROOT

KUBE = ROOT / "deploy" / "kubernetes"


def resources() -> list[Path]:
    """The manifest files ``kubectl apply -k`` applies, in kustomization order."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return [KUBE / name for name in kustomization["resources"]]


def objects() -> list[dict[str, Any]]:
    return [doc for path in resources() for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def router_container() -> dict[str, Any]:
    [container] = find("Deployment", "apirouter")["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
