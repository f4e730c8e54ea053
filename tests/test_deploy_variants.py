"""The gpu and tensorrt repository variants, field by field against what Triton's onnxruntime and tensorrt
backends accept, and their agreement with deploy/'s manifests (GPUs per pod, the monitoring rule); where
libnvinfer is looked for."""

import pytest
import yaml

from tests.deploy_helpers import ROOT, _containers, _docs

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
