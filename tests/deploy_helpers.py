"""Readers of deploy/'s Kubernetes manifests, shared by the deploy tests."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _docs():
    return {d["kind"]: d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d}


def _pod() -> dict:
    return _docs()["Deployment"]["spec"]["template"]["spec"]


def _containers() -> dict[str, dict]:
    return {c["name"]: c for c in _pod()["containers"]}
