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


def _containers() -> dict[str, dict]:
    pod = _docs()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_probes_ports_and_targets_agree():
    docs = _docs()
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    guard, triton = _containers()["guard"], _containers()["tritonserver"]
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports) == {"http", "grpc", "metrics"}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # The pod's HTTP and gRPC ports are the guard's; Triton binds loopback, where the guard forwards.
    g, t = _flags(guard["args"]), _flags(triton["args"])
    assert g["listen"] == f"0.0.0.0:{ports['http']}" and g["grpc-listen"] == f"0.0.0.0:{ports['grpc']}"
    assert t["http-address"] == t["grpc-address"] == "127.0.0.1"
    assert g["upstream"] == f"127.0.0.1:{t['http-port']}" and g["grpc-upstream"] == f"127.0.0.1:{t['grpc-port']}"
    assert t["metrics-port"] == str(ports["metrics"]) and "metrics-address" not in t
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/ready")):  # through the guard: the kubelet cannot reach loopback
        assert triton[probe]["httpGet"] == {"path": path, "port": ports["http"]}
    claims = {d["metadata"]["name"] for f in MANIFESTS for d in yaml.safe_load_all(f.read_text())
              if d and d["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert used == claims == {"boot-model-repository", "boot-trt-cache"}
    mounted = {m["name"] for m in triton["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == mounted


def test_the_guard_container_runs_as_written(tmp_path):
    """The guard container's command, with its ports made free, starts both guards; the image holds every
    boot_serve module they import (deploy/Dockerfile copies them)."""
    import ast
    import os
    import signal
    import subprocess
    import sys

    guard = _containers()["guard"]
    assert guard["command"] == ["python3", "-m", "boot_serve.guard"]
    args = [a.replace(":8000", ":0").replace(":8001", ":0").replace(":18000", ":1").replace(":18001", ":2")
            .replace("0.0.0.0", "127.0.0.1") for a in guard["args"]]
    proc = subprocess.Popen([sys.executable, "-m", "boot_serve.guard", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("boot guard: HTTP 127.0.0.1:") and lines[1].startswith("boot guard: gRPC"), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    copy = next(line for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines() if line.startswith("COPY"))
    copied = set(copy.split()[1:-1])
    needed, todo = set(), ["boot_serve/guard.py", "boot_serve/grpc_guard.py"]
    while todo:
        path = todo.pop()
        needed.add(path)
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("boot", "boot_serve"):
                dep = node.module.replace(".", "/") + ".py"
                if dep not in needed:
                    todo.append(dep)
    assert needed | {"boot_serve/__init__.py"} <= copied, needed - copied


# --------------------------------------------------------------------------------------------
# The gpu and tensorrt repository variants, field by field against what the backends accept
# --------------------------------------------------------------------------------------------
# Parameters of the onnxruntime backend's TensorRT execution accelerator: the keys its
# ModelState::LoadModel accepts (triton-inference-server/onnxruntime_backend, src/onnxruntime.cc); any
# other key fails the model load with "unknown parameter ... for TensorRT Execution Accelerator".
ORT_TRT_KEYS = {
    "precision_mode": {"FP32", "FP16", "BF16", "INT8"}, "max_workspace_size_bytes": int,
    "trt_max_partition_iterations": int, "trt_min_subgraph_size": int, "int8_calibration_table_name": str,
    "int8_use_native_calibration_table": bool, "trt_dla_enable": bool, "trt_dla_core": int,
    "trt_engine_cache_enable": bool, "trt_engine_cache_path": str, "trt_dump_subgraphs": bool,
    "trt_force_sequential_engine_build": bool, "trt_context_memory_sharing_enable": bool,
    "trt_layer_norm_fp32_fallback": bool, "trt_timing_cache_enable": bool, "trt_timing_cache_path": str,
    "trt_force_timing_cache": bool, "trt_detailed_build_log": bool, "trt_build_heuristics_enable": bool,
    "trt_sparsity_enable": bool, "trt_builder_optimization_level": int, "trt_auxiliary_streams": int,
    "trt_tactic_sources": str, "trt_extra_plugin_lib_paths": str, "trt_profile_min_shapes": str,
    "trt_profile_max_shapes": str, "trt_profile_opt_shapes": str, "trt_cuda_graph_enable": bool,
}
PLANS = {"version": "10.5.0", "plans": {m: {"path": f"{m}/1/model-trt10.5.0-sm90.plan",
                                              "profile": {"min": 1, "opt": 4, "max": 16}}
                                          for m in ("text_encoder", "boot_unet", "vae_decoder")}}


def _variant(variant: str, precision: str):
    from boot_serve import triton_repo

    manifest = dict(triton_repo.SHAPES_MANIFEST, precision=precision, max_batch=16, tensorrt=PLANS)
    return triton_repo, triton_repo.model_configs(manifest, variant)


def _check_value(key: str, value: str) -> None:
    kind = ORT_TRT_KEYS[key]
    if kind is bool:
        assert value in ("0", "1", "true", "false"), (key, value)
    elif kind is int:
        int(value)
    elif isinstance(kind, set):
        assert value in kind, (key, value)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_variant_fields_are_what_the_onnxruntime_backend_accepts(precision):
    triton_repo, configs = _variant("gpu", precision)
    for name in triton_repo.HEAVY_MODELS:
        c = configs[name]
        assert (c.platform, c.backend, c.default_model_filename) == ("onnxruntime_onnx", "onnxruntime", "model.onnx")
        (group,) = c.instance_group
        assert group.kind == group.KIND_GPU
        (accel,) = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert accel.name == "tensorrt"
        params = dict(accel.parameters)
        assert set(params) <= set(ORT_TRT_KEYS), set(params) - set(ORT_TRT_KEYS)
        for key, value in params.items():
            _check_value(key, value)
        assert params["precision_mode"] == ("FP16" if precision == "fp16" else "FP32")
        assert (params.get("trt_layer_norm_fp32_fallback") == "1") == (precision == "fp16")
        # Engines and timing cache on the persistent volume the Deployment mounts, never /tmp.
        assert params["trt_engine_cache_path"] == f"{triton_repo.TRT_CACHE_DIR}/{name}"
        assert params["trt_timing_cache_enable"] == "1" and params["trt_timing_cache_path"] == triton_repo.TRT_CACHE_DIR
        # Profiles name every graph input with its per-request dims (as the graph sees them).
        dims = {t.name: list(t.reshape.shape) if t.HasField("reshape") else list(t.dims) for t in c.input}
        for key, batch in (("trt_profile_min_shapes", 1), ("trt_profile_opt_shapes", 4),
                           ("trt_profile_max_shapes", 16)):
            shapes = dict(item.split(":") for item in params[key].split(","))
            assert set(shapes) == set(dims)
            for tensor, shape in shapes.items():
                assert [int(d) for d in shape.split("x")] == [batch, *dims[tensor]], (key, tensor)
    mounts = {m["mountPath"] for m in _containers()["tritonserver"]["volumeMounts"]}
    assert triton_repo.TRT_CACHE_DIR in mounts


def test_tensorrt_variant_fields_and_version_check():
    triton_repo, configs = _variant("tensorrt", "fp16")
    for name in triton_repo.HEAVY_MODELS:
        c = configs[name]
        assert (c.platform, c.backend) == ("tensorrt_plan", "tensorrt")
        assert c.default_model_filename == PLANS["plans"][name]["path"].split("/")[-1]
        assert not c.HasField("optimization")  # accelerators are an onnxruntime-backend setting
        assert c.max_batch_size == 16 and c.instance_group[0].kind == c.instance_group[0].KIND_GPU
    manifest = dict(triton_repo.SHAPES_MANIFEST, tensorrt=dict(PLANS, version="10.7.0"))
    with pytest.raises(triton_repo.RepositoryError, match=r"built with TensorRT 10.7.0; the serving image runs "
                                                          r"TensorRT 10.5 .*--serving-tensorrt 10.7"):
        triton_repo.model_configs(manifest, "tensorrt")
    assert triton_repo.model_configs(manifest, "tensorrt", serving_tensorrt="10.7")
    assert triton_repo.model_configs(dict(manifest, tensorrt=dict(PLANS, version="10.7.0", version_compatible=True)),
                                     "tensorrt")


def test_gpus_per_pod_agree_with_the_instance_groups():
    """The Deployment asks for as many GPUs as the README's --gpus list names, and pins the GPU model."""
    pod = _docs()["Deployment"]["spec"]["template"]["spec"]
    limits = _containers()["tritonserver"]["resources"]["limits"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    gpus = int(limits["nvidia.com/gpu"])
    assert f"--gpus {','.join(str(i) for i in range(gpus))}" in readme
    assert "nvidia.com/gpu.product" in pod["nodeSelector"]


def test_monitoring_rule_is_safe_on_an_idle_pod():
    files = sorted((ROOT / "deploy" / "monitoring").glob("*.yaml"))
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text())]
    monitor = next(d for d in docs if d.get("kind") == "PodMonitor")
    labels = _docs()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rules = next(d for d in docs if "rules" in d)["rules"]["custom"]
    query = rules[0]["metricsQuery"]
    assert rules[0]["name"]["as"] == _docs()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert "clamp_min(" in query  # an idle pod: 0 queued / 0 requests must not be NaN


def test_nvinfer_is_looked_for_where_the_tensorrt_wheel_puts_it(tmp_path, monkeypatch):
    import sys

    from boot_serve import runtime

    wheel = tmp_path / "tensorrt_libs"
    wheel.mkdir()
    (wheel / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt_libs", raising=False)
    names = runtime.nvinfer_candidates()
    assert names[0] == "libnvinfer.so.10" and str(wheel / "libnvinfer.so.10") in names
