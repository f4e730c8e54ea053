"""The model repository and the serve launcher, without a shared server: the committed configs are the
generator's output and valid model configs, every variant renders, the configs match the exported graphs;
check_repository says what is missing; `python -m boot_serve.serve` refuses an unexported repository, prints
its endpoints when ready and exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boot_serve import triton_configs, triton_repo
from boot_serve.client import Client
from boot_serve.triton_process import find_free_ports

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Configs (no server)
# --------------------------------------------------------------------------------------------
def _committed_configs() -> dict[str, str]:
    return {m: (ROOT / "model_repository" / m / "config.pbtxt").read_text() for m in triton_repo.MODELS}


def test_committed_configs_are_valid_model_configs():
    for name, text in _committed_configs().items():
        config = triton_repo.parse_config(text)  # Triton's ModelConfig protobuf schema
        assert config.name == name
        assert config.max_batch_size >= 8
        if name != triton_repo.ENSEMBLE:
            assert config.HasField("dynamic_batching"), name


def test_committed_configs_are_the_generator_output(tmp_path):
    """model_repository/ holds the configs `triton_repo --shapes-defaults` writes (no hand edits); every
    Python model's 1/model.py it writes is a copy of the one source, boot_serve/triton_model.py, with the
    modules it imports copied beside it (generated, not committed, like the graphs)."""
    assert triton_repo.main(["--shapes-defaults", "--repository", str(tmp_path)]) == 0
    committed = ROOT / "model_repository"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("config.pbtxt"))
    assert written == sorted(p.relative_to(committed).as_posix() for p in committed.rglob("config.pbtxt"))
    for rel in written:
        assert (tmp_path / rel).read_text() == (committed / rel).read_text(), f"{rel}: rerun with --shapes-defaults"
    sources = sorted(tmp_path.glob("*/1/model.py"))
    assert {p.parent.parent.name for p in sources} == {"boot_txt2img", "preprocess", *triton_repo.HEAVY_MODELS}
    assert all(p.read_text() == triton_repo.MODEL_SOURCE.read_text() for p in sources)
    for name, source in triton_repo.MODEL_FILES.items():
        assert sorted(tmp_path.glob(f"*/1/{name}")) == [p.with_name(name) for p in sources], name
        assert all(p.with_name(name).read_text() == source.read_text() for p in sources), name
    guidance = triton_repo.parse_config(_committed_configs()[triton_repo.ENSEMBLE]).parameters["guidance_scale"]
    assert guidance.string_value == "4.5"  # the shipped student's recommended scale


def test_client_facing_contract():
    config = triton_repo.parse_config(_committed_configs()[triton_repo.ENSEMBLE])
    inputs = {t.name: t for t in config.input}
    assert list(inputs) == ["PROMPT", "SEED", "GUIDANCE_SCALE"]
    assert (inputs["PROMPT"].data_type, list(inputs["PROMPT"].dims)) == (triton_repo_type("TYPE_STRING"), [1])
    assert (inputs["SEED"].data_type, list(inputs["SEED"].dims)) == (triton_repo_type("TYPE_INT64"), [1])
    assert inputs["GUIDANCE_SCALE"].optional and not inputs["SEED"].optional and not inputs["PROMPT"].optional
    (image,) = config.output
    assert (image.name, image.data_type, list(image.dims)) == ("IMAGE", triton_repo_type("TYPE_UINT8"), [64, 64, 3])


def triton_repo_type(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(name)


@pytest.mark.parametrize("variant", triton_repo.VARIANTS)
def test_every_variant_renders_valid_configs(variant):
    manifest = dict(triton_repo.SHAPES_MANIFEST, precision="fp16", max_batch=16, tensorrt={
        "version": "10.5.0", "plans": {
        m: {"path": f"{m}/1/model-trt10.9-sm90.plan", "profile": {"min": 1, "opt": 4, "max": 16}}
        for m in triton_repo.HEAVY_MODELS}})
    configs = triton_repo.model_configs(manifest, variant)
    for config in configs.values():
        again = triton_repo.parse_config(triton_repo.render(config, variant))
        assert again == config and again.max_batch_size == 16
    # The composition and the client contract do not depend on the variant.
    cpu = triton_repo.model_configs(manifest, "cpu-ensemble")
    for name in triton_configs.PYTHON_MODELS:
        assert configs[name] == cpu[name]
    ensemble, expected = configs[triton_repo.ENSEMBLE], cpu[triton_repo.ENSEMBLE]
    if variant == "cpu-onehop":  # one Python model with the ensemble's signature and guidance parameters
        assert ensemble.backend == "python" and not ensemble.platform and ensemble.HasField("dynamic_batching")
        assert (list(ensemble.input), list(ensemble.output)) == (list(expected.input), list(expected.output))
        assert all(ensemble.parameters[k] == v for k, v in expected.parameters.items())
    else:
        assert ensemble == expected
    for name in triton_repo.HEAVY_MODELS:
        assert [t.name for t in configs[name].input] == [t.name for t in cpu[name].input]
        if variant == "gpu":
            assert configs[name].platform == "onnxruntime_onnx"
            (accel,) = configs[name].optimization.execution_accelerators.gpu_execution_accelerator
            assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
            assert accel.parameters["trt_profile_max_shapes"].startswith(f"{configs[name].input[0].name}:16x")
        elif variant == "tensorrt":
            assert configs[name].platform == "tensorrt_plan"
            assert configs[name].default_model_filename == "model-trt10.9-sm90.plan"
    # guidance_scale is one scalar per request; the graph takes (B,)
    unet = {t.name: t for t in configs["boot_unet"].input}
    assert list(unet["guidance_scale"].dims) == [1] and list(unet["guidance_scale"].reshape.shape) == []


@pytest.mark.parametrize("variant", ["gpu", "tensorrt"])
def test_instance_groups_across_gpus(variant, tmp_path):
    manifest = dict(triton_repo.SHAPES_MANIFEST, tensorrt={"version": "10.5.0", "plans": {
        m: {"path": f"{m}/1/model.plan", "profile": {"min": 1, "opt": 4, "max": 8}} for m in triton_repo.HEAVY_MODELS}})
    configs = triton_repo.model_configs(manifest, variant, instances=2, gpus=(0, 1, 3))
    for name in triton_repo.HEAVY_MODELS:
        (group,) = configs[name].instance_group
        assert (group.kind, group.count, list(group.gpus)) == (group.KIND_GPU, 2, [0, 1, 3])
        assert triton_repo.parse_config(triton_repo.render(configs[name], variant)) == configs[name]
    pre = configs["preprocess"].instance_group  # Python preprocessing stays on the CPU: one group per copy
    cpu = pre[0].KIND_CPU
    assert [(g.kind, g.count, list(g.gpus), g.rate_limiter.priority) for g in pre] == [
        (cpu, 1, [], 1), (cpu, 1, [], 1000)]
    for bad in [(), (0, 0), (-1,)]:
        with pytest.raises(ValueError, match="distinct GPU ids"):
            triton_repo.model_configs(manifest, variant, gpus=bad)
    with pytest.raises(ValueError, match="needs the gpu or tensorrt variant"):
        triton_repo.model_configs(manifest, "cpu", gpus=(0,))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert triton_repo.main(["--repository", str(tmp_path), "--variant", variant, "--gpus", "0,1"]) == 0
    assert "gpus: [0, 1]" in (tmp_path / "boot_unet" / "config.pbtxt").read_text()


def test_tensorrt_variant_needs_plans():
    with pytest.raises(triton_repo.RepositoryError, match="--tensorrt"):
        triton_repo.model_configs(triton_repo.SHAPES_MANIFEST, "tensorrt")


def test_every_python_model_runs_the_one_shared_source(tmp_path):
    """preprocess, the three ONNX Runtime models and the one-hop boot_txt2img: one model.py (and the
    modules it imports), as the repository writer puts them beside the committed configs."""
    assert triton_repo.main(["--shapes-defaults", "--repository", str(tmp_path)]) == 0
    source = triton_repo.MODEL_SOURCE.read_text()
    python = [name for name, text in _committed_configs().items() if triton_repo.parse_config(text).backend == "python"]
    assert set(triton_configs.PYTHON_MODELS + triton_repo.HEAVY_MODELS) <= set(python)
    for name in python:
        assert (tmp_path / name / "1" / "model.py").read_text() == source, name
        for filename, sibling in triton_repo.MODEL_FILES.items():
            assert (tmp_path / name / "1" / filename).read_text() == sibling.read_text(), (name, filename)


def test_variant_names_and_switching(tmp_path):
    assert triton_repo.resolve_variant("cpu") == triton_repo.DEFAULT_CPU_VARIANT
    with pytest.raises(ValueError, match="variant must be one of"):
        triton_repo.resolve_variant("cpu-bls")
    (tmp_path / "manifest.json").write_text(json.dumps(triton_repo.SHAPES_MANIFEST))
    model_py = tmp_path / triton_repo.ENSEMBLE / "1" / "model.py"
    for variant, has_model_py in (("cpu-onehop", True), ("cpu-ensemble", False),
                                  ("cpu", triton_repo.DEFAULT_CPU_VARIANT == "cpu-onehop")):
        assert triton_repo.main(["--repository", str(tmp_path), "--variant", variant]) == 0
        assert model_py.is_file() == has_model_py, variant
        for filename in triton_repo.MODEL_FILES:  # the modules beside model.py come and go with it
            assert model_py.with_name(filename).is_file() == has_model_py, (variant, filename)
        assert triton_repo.served_variant(tmp_path) == triton_repo.resolve_variant(variant)
    with pytest.raises(SystemExit):
        triton_repo.main(["--repository", str(tmp_path), "--variant", "bls"])


def test_configs_match_exported_graphs(exported_repository):
    """Tensor names and per-request dims in config.pbtxt are the ONNX graphs' (batch axis aside)."""
    import onnx

    manifest = json.loads((exported_repository / "manifest.json").read_text())
    configs = triton_repo.model_configs(manifest)
    for name in triton_repo.HEAVY_MODELS:
        graph = onnx.load(str(exported_repository / name / "1" / "model.onnx"), load_external_data=False).graph
        for tensors, values in ((configs[name].input, graph.input), (configs[name].output, graph.output)):
            assert [t.name for t in tensors] == [v.name for v in values], name
            for t, v in zip(tensors, values):
                dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
                expected = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
                # Dims the exporter left symbolic have dim_value 0.
                assert all(d in (0, e) for d, e in zip(dims, expected)) and len(dims) == len(expected), (name, t.name)


def test_write_configs_fills_a_fresh_repository(exported_repository, tmp_path):
    manifest = json.loads((exported_repository / "manifest.json").read_text())
    written = triton_repo.write_configs(tmp_path, "cpu", manifest)
    assert {p.relative_to(tmp_path).as_posix() for p in written} >= {
        "boot_txt2img/config.pbtxt", "preprocess/1/model.py", "boot_unet/1/model.py",
        "preprocess/1/triton_text_cache.py", "boot_unet/1/triton_text_cache.py"}


# --------------------------------------------------------------------------------------------
# Repository check and launcher errors (no server)
# --------------------------------------------------------------------------------------------
def test_check_repository_says_what_is_missing(tmp_path, exported_repository):
    with pytest.raises(triton_repo.RepositoryError, match="does not exist.*boot_serve.export"):
        triton_repo.check_repository(tmp_path / "nowhere")
    with pytest.raises(triton_repo.RepositoryError, match="no manifest.json: it has not been exported yet"):
        triton_repo.check_repository(ROOT / "docs")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported_repository, broken)
    (broken / "boot_unet" / "1" / "model.onnx").unlink()
    (broken / "preprocess" / "config.pbtxt").unlink()
    (broken / "boot_txt2img" / "1" / "triton_text_cache.py").unlink()  # model.py would not import
    with pytest.raises(triton_repo.RepositoryError) as err:
        triton_repo.check_repository(broken)
    assert "boot_unet/1/model.onnx is missing" in str(err.value)
    assert "preprocess/config.pbtxt is missing" in str(err.value)
    assert "boot_txt2img/1/triton_text_cache.py is missing" in str(err.value)
    assert triton_repo.check_repository(exported_repository)["max_length"] == 16


def test_serve_cli_refuses_a_repository_that_is_not_exported(tmp_path):
    (tmp_path / "repo").mkdir()
    proc = subprocess.run([sys.executable, "-m", "boot_serve.serve", "--repository", str(tmp_path / "repo"),
                           "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "has not been exported yet" in proc.stderr and "python -m boot_serve.export" in proc.stderr
    assert "WARNING: binding Triton to '0.0.0.0'" in proc.stderr


# --------------------------------------------------------------------------------------------
# The serve CLI: ready message, SIGTERM -> clean exit
# --------------------------------------------------------------------------------------------
def test_serve_cli_starts_prints_endpoints_and_stops_on_sigterm(exported_repository):
    ports = [str(port) for port in find_free_ports(*["127.0.0.1"] * 3)]
    proc = subprocess.Popen([sys.executable, "-m", "boot_serve.serve", "--repository", str(exported_repository),
                             "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops it" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        text = "".join(lines)
        assert f"HTTP     127.0.0.1:{ports[0]}" in text and f"gRPC     127.0.0.1:{ports[1]}" in text
        with Client(f"127.0.0.1:{ports[0]}") as c:
            assert c.ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
