"""deploy/: the Kubernetes manifests are valid against the Kubernetes API schemas and consistent with each
other; the pod and the network policy carry the hardening deploy/README.md describes. (The image:
test_deploy_image.py; the gpu and tensorrt repository variants: test_deploy_variants.py.)"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy_helpers import DEPLOY, MANIFESTS, ROOT, _containers, _docs, _pod

K8S_VERSION = "1.30.0"
KEY_FILE = "/run/boot/operator-key"  # where the operator-key Secret appears in both containers


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def _triton_script() -> str:
    args = _containers()["tritonserver"]["args"]
    assert args[:2] == ["/bin/sh", "-c"] and len(args) == 3, args
    return args[2]


def _triton_args() -> list[str]:
    """tritonserver's argv as the container's shell script writes it (variables unexpanded)."""
    script = _triton_script().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if line.strip().startswith("exec tritonserver"))
    return shlex.split(line)[2:]


def _ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in _pod()["containers"] for p in c.get("ports", [])}


def _quantity(text) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


# --------------------------------------------------------------------------------------------
# Schemas and wiring
# --------------------------------------------------------------------------------------------
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


def test_ports_probes_and_targets_agree():
    from boot_serve import triton_repo

    docs = _docs()
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    guard, triton = _containers()["guard"], _containers()["tritonserver"]
    ports = _ports()
    # Clients reach the guard's two ports through the Service; metrics and probes are not on it.
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http", "grpc"}
    assert set(ports) == {"http", "grpc", "health", "metrics"}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # The pod's HTTP, gRPC and probe ports are the guard's; Triton binds loopback, where the guard forwards.
    g, t = _flags(guard["args"]), _flags(_triton_args())
    assert g["listen"] == f"0.0.0.0:{ports['http']}" and g["grpc-listen"] == f"0.0.0.0:{ports['grpc']}"
    assert g["health-listen"] == f"0.0.0.0:{ports['health']}"
    assert t["http-address"] == t["grpc-address"] == "127.0.0.1"
    assert g["upstream"] == f"127.0.0.1:{t['http-port']}" and g["grpc-upstream"] == f"127.0.0.1:{t['grpc-port']}"
    assert g["models"] == triton_repo.ENSEMBLE and g["operator-key-file"] == KEY_FILE
    # Metrics on the pod's own address (Triton's default would be --http-address, loopback: unscrapable).
    assert t["metrics-port"] == str(ports["metrics"]) and t["metrics-address"] == "$POD_IP"
    env = {e["name"]: e for e in triton["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert t["model-repository"] == "/models" and t["model-control-mode"] == "none"


def test_probes_use_the_guards_probe_port_never_a_client_port():
    guard, triton = _containers()["guard"], _containers()["tritonserver"]
    ports = _ports()
    assert guard["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "health"}
    assert guard["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "health"}
    assert guard["readinessProbe"]["timeoutSeconds"] >= 3  # the guard gives Triton 2 s to answer
    # Model load: the startup probe waits up to 10 minutes for Triton's readiness, on the probe port
    # (a container may only name its own ports, so the number).
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": ports["health"]}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Triton's liveness is asked on loopback from inside its container: a guard restart does not
    # restart Triton.
    command = triton["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    assert f"http://127.0.0.1:{_flags(_triton_args())['http-port']}/v2/health/live" in command[2]
    for c in (guard, triton):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "httpGet" in c.get(probe, {}):
                assert c[probe]["httpGet"]["port"] in ("health", ports["health"]), (c["name"], probe)
    # Restarts: the kubelet restarts either container when it exits or fails liveness; the pod-level
    # supervisor (python -m boot_serve.serve) is not what runs here.
    assert _pod().get("restartPolicy", "Always") == "Always"
    assert all("boot_serve.serve" not in " ".join(c.get("command", []) + c.get("args", []))
               for c in _pod()["containers"])
    assert "boot_serve.serve" in (DEPLOY / "README.md").read_text()


def test_triton_start_script_closes_its_control_apis(tmp_path):
    """The tritonserver container's shell script, run with a stand-in tritonserver: it `exec`s Triton
    (same process, so Triton gets the kubelet's signals) with the restriction flags of
    boot_serve/access.py: the control APIs behind a fresh random key, statistics behind the operator key."""
    stub = tmp_path / "bin" / "tritonserver"
    stub.parent.mkdir()
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'pid': os.getpid(), 'args': sys.argv[1:]}))\n")
    stub.chmod(0o755)
    key_file = tmp_path / "operator-key"
    operator_key = "Zm9v+/YmFy=="  # base64 (openssl rand -base64): '+', '/' and '=' pass through intact
    key_file.write_text(operator_key)
    script = _triton_script()
    assert KEY_FILE in script
    # Kubernetes expands $(NAME) of defined variables and turns $$ into $ before the shell runs: the
    # script must mean the same to both (its $(...) are command substitutions, no variable's name).
    assert "$$" not in script and not re.search(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", script)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "POD_IP": "10.1.2.3"}

    def start(key_path: Path):
        proc = subprocess.Popen(["/bin/sh", "-c", script.replace(KEY_FILE, str(key_path))], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        return proc, out, err

    runs = []
    for _ in range(2):
        proc, out, err = start(key_file)
        assert proc.returncode == 0, err
        seen = json.loads(out)
        assert seen["pid"] == proc.pid  # exec: the shell became tritonserver
        runs.append(seen["args"])
    flags = _flags(runs[0])
    assert flags["metrics-address"] == "10.1.2.3"
    restricted = [a for a in runs[0] if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    specs = {}
    for arg in restricted:
        option, spec = arg.removeprefix("--").split("=", 1)
        categories, header_key = spec.split(":", 1)
        header, key = header_key.split("=", 1)
        specs[(option, categories)] = (header, key)
    closed_key = specs[("http-restricted-api", "shared-memory,model-repository,trace,logging")][1]
    assert specs == {
        (option, categories): ("boot-operator-key", key)
        for option in ("http-restricted-api", "grpc-restricted-protocol")
        for categories, key in (("shared-memory,model-repository,trace,logging", closed_key),
                                ("statistics", operator_key))}
    assert len(closed_key) >= 32 and re.fullmatch(r"[A-Za-z0-9]+", closed_key) and closed_key != operator_key
    other = [a for a in runs[1] if a.startswith("--http-restricted-api=shared-memory")][0].rsplit("=", 1)[1]
    assert other != closed_key  # a fresh key at every start
    try:
        from boot_serve import access
    except ImportError:
        access = None
    if access is not None:  # the same flags the launcher gives a tritonserver it starts itself
        assert sorted(restricted) == sorted(access.triton_restriction_args(operator_key, closed_key))
    # No key, no Triton: the container fails at once, saying why.
    empty = tmp_path / "empty"
    empty.write_text("")
    proc, out, err = start(empty)
    assert proc.returncode != 0 and not out and "boot-operator-key" in err


def test_the_guard_container_runs_as_written(tmp_path):
    """The guard container's command, with its ports made free and the key file a temporary one, starts
    the HTTP and gRPC guards and the probe listener, which answers live (200) and not ready (503: no
    Triton behind it); SIGTERM ends it cleanly."""
    guard = _containers()["guard"]
    assert guard["command"] == ["python3", "-m", "boot_serve.guard"]
    flags = _flags(guard["args"])
    usage = subprocess.run([sys.executable, "-m", "boot_serve.guard", "--help"], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    missing = [f"--{name}" for name in flags if f"--{name}" not in usage]
    if missing:
        pytest.skip(f"python -m boot_serve.guard has no {', '.join(missing)} (the manifest's interface)")
    key_file = tmp_path / "operator-key"
    key_file.write_text("operator-key\n")
    local = {"listen": "127.0.0.1:0", "grpc-listen": "127.0.0.1:0", "health-listen": "127.0.0.1:0",
             "upstream": "127.0.0.1:1", "grpc-upstream": "127.0.0.1:2", "operator-key-file": str(key_file)}
    args = [f"--{name}={local.get(name, value)}" for name, value in flags.items()]
    proc = subprocess.Popen([sys.executable, "-m", "boot_serve.guard", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = {}
        while len(lines) < 3:
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read() if proc.poll() is not None else "")
            match = re.match(r"boot guard: (HTTP|gRPC|probes) ([0-9.]+:\d+)", line)
            if match:
                lines[match[1]] = match[2]
        probes = lines["probes"]
        assert urllib.request.urlopen(f"http://{probes}/v2/health/live", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{probes}/v2/health/ready", timeout=10)
        assert refused.value.code == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()


# --------------------------------------------------------------------------------------------
# The pod
# --------------------------------------------------------------------------------------------
def test_pod_and_containers_run_unprivileged_on_a_read_only_root():
    pod = _pod()
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0 and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
        assert not pod.get(key), key
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), c["name"]
        assert sc["runAsNonRoot"] is True and sc.get("runAsUser", ctx["runAsUser"]) == ctx["runAsUser"]
        assert sc.get("seccompProfile", ctx["seccompProfile"]) == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        # Where Python and Triton write: an emptyDir of the pod's own, never the image.
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], c["name"]
        # The operator key: the Secret, read-only, where the guard flag and Triton's script read it.
        key = mounts[str(Path(KEY_FILE).parent)]
        assert key["readOnly"] is True and volumes[key["name"]]["secret"]["secretName"] == "boot-operator-key"
        assert volumes[key["name"]]["secret"]["items"] == [{"key": "key", "path": Path(KEY_FILE).name}]
        assert volumes[key["name"]]["secret"]["defaultMode"] == 0o440
    triton = {m["mountPath"]: m for m in _containers()["tritonserver"]["volumeMounts"]}
    assert volumes[triton["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"  # Python-backend tensors


def test_volumes_share_only_read_only_data():
    from boot_serve import triton_repo

    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"]: d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text())
              if d and d["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"]: v for v in volumes.values() if "persistentVolumeClaim" in v}
    assert set(used) == set(claims) == {"boot-model-repository"}
    # The model repository, read by every replica, written by none.
    assert claims["boot-model-repository"]["spec"]["accessModes"] in (["ReadOnlyMany"], ["ReadWriteOnce"])
    assert used["boot-model-repository"]["persistentVolumeClaim"]["readOnly"] is True
    for c in pod["containers"]:
        for m in c["volumeMounts"]:
            if "persistentVolumeClaim" in volumes[m["name"]]:
                assert m["readOnly"] is True, (c["name"], m)
    # Nothing asks for ReadWriteMany (few default storage classes provide it), and the TensorRT engine
    # cache, the one thing Triton writes, is per pod: no two replicas write the same files.
    assert all("ReadWriteMany" not in c["spec"]["accessModes"] for c in claims.values())
    triton = {m["mountPath"]: m["name"] for m in _containers()["tritonserver"]["volumeMounts"]}
    assert "emptyDir" in volumes[triton[triton_repo.TRT_CACHE_DIR]]
    assert {m["name"] for c in pod["containers"] for m in c["volumeMounts"]} == set(volumes)


def test_resources_are_bounded_and_images_pinned():
    pod = _pod()
    ephemeral_limit = 0.0
    for c in pod["containers"]:
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory", "ephemeral-storage"} <= set(requests), c["name"]
        assert {"memory", "ephemeral-storage"} <= set(limits), c["name"]
        for key in set(requests) & set(limits):
            assert _quantity(requests[key]) <= _quantity(limits[key]), (c["name"], key)
        ephemeral_limit += _quantity(limits["ephemeral-storage"])
        name, _, tag = c["image"].rpartition(":")
        assert name and tag and tag != "latest", c["image"]
    triton = _containers()["tritonserver"]["resources"]
    assert triton["requests"]["nvidia.com/gpu"] == triton["limits"]["nvidia.com/gpu"]
    # The disk-backed emptyDirs fit in the pod's ephemeral-storage limit; the memory-backed one (shm)
    # counts against Triton's memory limit and fits in it.
    disk = memory = 0.0
    for v in pod["volumes"]:
        if "emptyDir" in v:
            size = _quantity(v["emptyDir"]["sizeLimit"])
            if v["emptyDir"].get("medium") == "Memory":
                memory += size
            else:
                disk += size
    assert disk <= ephemeral_limit and memory < _quantity(triton["limits"]["memory"])


def test_shutdown_lets_in_flight_requests_finish():
    """Order on deletion: the pod leaves the endpoints; the guard serves through its preStop, then stops;
    Triton serves the guard until its own longer preStop ends, then drains (--exit-timeout-secs) and
    exits, all within the grace period; a rollout adds a pod before it removes one."""
    dep = _docs()["Deployment"]["spec"]
    pod = _pod()
    guard, triton = _containers()["guard"], _containers()["tritonserver"]

    def pre_stop(c) -> int:
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        return int(command[1])

    guard_stop, triton_stop = pre_stop(guard), pre_stop(triton)
    exit_timeout = int(_flags(_triton_args())["exit-timeout-secs"])
    assert 5 <= guard_stop and guard_stop + 10 <= triton_stop  # the guard stops (up to 10 s) before Triton does
    assert triton_stop + exit_timeout + 10 <= pod["terminationGracePeriodSeconds"]
    assert dep["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    startup = triton["startupProbe"]
    assert dep["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


def test_network_policy_admits_clients_to_the_service_ports_only():
    policy = _docs()["NetworkPolicy"]["spec"]
    labels = _docs()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ports = _ports()
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    open_to_all, by_source = set(), {}
    for rule in policy["ingress"]:
        assert rule["ports"], rule  # a rule without ports would admit every port
        admitted = {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}
        if "from" not in rule:
            open_to_all |= admitted
        else:
            for peer in rule["from"]:
                by_source.setdefault(json.dumps(peer, sort_keys=True), set()).update(admitted)
    assert open_to_all == {(ports["http"], "TCP"), (ports["grpc"], "TCP")}
    # Metrics from the monitoring namespace's Prometheus alone, and nothing else from there.
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    assert by_source == {json.dumps(prometheus, sort_keys=True): {(ports["metrics"], "TCP")}}
    # The probe port is in no rule: only the kubelet reaches it.
    assert all(ports["health"] not in {p for p, _ in s} for s in [open_to_all, *by_source.values()])
    monitor = next(d for f in sorted((DEPLOY / "monitoring").glob("*.yaml"))
                   for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_readme_says_how_to_build_and_create_the_secret():
    readme = (DEPLOY / "README.md").read_text()
    assert "--build-arg TRITON_DIGEST=" in readme and "imagetools inspect" in readme
    assert "kubectl create secret generic boot-operator-key --from-literal=key=" in readme
    assert "uv pip compile deploy/requirements.in" in readme
