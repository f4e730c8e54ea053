"""Kubernetes manifests: valid against the Kubernetes API schemas, and consistent with each other."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def _docs():
    return {d["kind"]: d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(path):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in yaml.safe_load_all(path.read_text()):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_rejects_a_broken_manifest():
    kv = pytest.importorskip("kubernetes_validate")
    broken = _docs()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_probes_ports_and_targets_agree():
    docs = _docs()
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    args = " ".join(container["args"])
    for name, port in ports.items():
        assert f"--{name}-port={port}" in args
    claim = next(v for v in pod["volumes"] if v["name"] == "model-repository")["persistentVolumeClaim"]
    assert claim["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
