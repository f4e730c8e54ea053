"""The Triton model repository: config.pbtxt generator, repository check, config validation.

    python -m boot_serve.triton_repo --repository model_repository                  # CPU: the default variant
    python -m boot_serve.triton_repo --repository model_repository --variant cpu-onehop    # CPU, one model
    python -m boot_serve.triton_repo --repository model_repository --variant cpu-ensemble  # CPU, 4-model chain
    python -m boot_serve.triton_repo --repository model_repository --variant gpu    # onnxruntime + TensorRT EP
    python -m boot_serve.triton_repo --repository model_repository --variant tensorrt  # TensorRT plans

Layout (docs/interfaces.md; the ONNX graphs, tokenizer and manifest.json are written by
`python -m boot_serve.export`, everything else here):

    boot_txt2img/   ensemble, the client-facing model:
                      PROMPT BYTES [1], SEED INT64 [1], GUIDANCE_SCALE FP32 [1] (optional)
                      -> IMAGE UINT8 [H, W, 3]
    preprocess/     Python: checks the request (per-request errors), tokenizer, noise from seed:
                      PROMPT, SEED, GUIDANCE_SCALE -> input_ids [L], noise [C, h, w], guidance_scale [1]
    text_encoder/   input_ids -> text_states [L, D]
    boot_unet/      noise, text_states, guidance_scale -> latents [C, h, w]
    vae_decoder/    latents -> image [H, W, 3] (uint8 postprocess inside the graph)

SDXL-family students (manifest "tokenizer_2", "text_embeds_size" P): preprocess also gives
input_ids_2 [L] (the second tokenizer), text_encoder takes it and also gives text_embeds [P]
(the pooled embedding), boot_unet takes text_embeds too (its time ids are graph constants).
The client-facing model is the same for every family.

Every model batches dynamically (max_batch_size = manifest "max_batch", at least 8). The three
heavy models are, per variant:
- `cpu-ensemble`: Python-backend models holding an ONNX Runtime session (the CPU tritonserver of the
  nvidia-pytriton wheel has only the Python backend);
- `cpu-onehop`: as cpu-ensemble, but `boot_txt2img` is not the ensemble: it is one Python-backend
  model that serves the whole request (checks, tokenizer, noise, the three graphs in ONNX Runtime),
  one stub round trip per batch instead of four. The composing models' configs are written too
  but not loaded: `boot_serve.serve` loads `boot_txt2img` and what it composes, nothing else;
- `cpu`: the default CPU variant, DEFAULT_CPU_VARIANT (measured better on the shipped student:
  docs/serving.md);
- `gpu`: the onnxruntime backend on KIND_GPU with the TensorRT execution provider as GPU
  accelerator (precision from the manifest, batch profile 1 / 4 / max, engine cache);
- `tensorrt`: the tensorrt backend on the plans `export --tensorrt` built (manifest "tensorrt").
Every Python-backend model runs the same source, boot_serve/triton_model.py, copied to its
`1/model.py`. preprocess and the ensemble are the same in every ensemble variant. The ensemble is a chain:
preprocess -> text_encoder -> boot_unet -> vae_decoder. preprocess is the only step that
rejects requests, and no other step holds a request while it does (Triton 2.51 mishandles a
request failed by one of two parallel ensemble steps: hangs, reads of freed inputs).
In the CPU variants the model that runs the text encoder (cpu-onehop: boot_txt2img, cpu-ensemble:
text_encoder) keeps a text-state cache, so a repeated prompt skips the text encoder: config parameter
`text_cache_bytes` (--text-cache-bytes, bytes per instance, default TEXT_CACHE_BYTES, 0 = off).

The configs are generated from manifest.json (concrete dims, so that clients see H, W in the
model metadata and TensorRT gets its profiles) as ModelConfig protobufs, so an invalid field
cannot be written. The configs committed in model_repository/ are this generator's output for
the shipped shapes student (`SHAPES_MANIFEST`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ENSEMBLE = "boot_txt2img"
PYTHON_MODELS = ("preprocess",)
HEAVY_MODELS = ("text_encoder", "boot_unet", "vae_decoder")
MODELS = (ENSEMBLE, *PYTHON_MODELS, *HEAVY_MODELS)
ONEHOP, CPU_ENSEMBLE = "cpu-onehop", "cpu-ensemble"
VARIANTS = (ONEHOP, CPU_ENSEMBLE, "gpu", "tensorrt")
CPU_VARIANTS = (ONEHOP, CPU_ENSEMBLE)
# `--variant cpu`: the CPU variant measured better on the shipped student (docs/serving.md, docs/bench:
# on 2 shared CPU cores the ensemble answered a lone request in about half the one-hop model's time).
DEFAULT_CPU_VARIANT = ONEHOP
MANIFEST = "manifest.json"
MIN_MAX_BATCH = 8
TRT_OPT_BATCH = 4
# Dynamic batching: how long a model waits to fill a batch (microseconds). GPU variants: a few ms for
# the GPU models, since a bigger batch is nearly free there; none for preprocess, which runs on the
# CPU in every variant (so it is the same model everywhere).
QUEUE_DELAY_US = {"preprocess": 0, "text_encoder": 4000, "boot_unet": 4000, "vae_decoder": 4000}
# The CPU variant waits for nothing: on 2 cores (shipped student, README "Demo and benchmark") the
# delays above cost four chained waits at low load (p50 at concurrency 1: 52.6 ms with them, 33.8 ms
# without) and bought 5% more images/s at concurrency 8 (47.1 vs 44.8). Requests that queue while a
# model is busy are still batched together.
CPU_QUEUE_DELAY_US = dict.fromkeys(QUEUE_DELAY_US, 0)
# Two copies of the one-hop model: while one runs a batch, the next batch starts in the other (the
# ensemble gets that overlap from its four models). With one copy, throughput barely grows with load: a
# batch of 8 took 6 to 8 times as long as a batch of 1 (ONNX Runtime, shipped student, 2 shared CPU cores).
ONEHOP_INSTANCES = 2
MODEL_SOURCE = Path(__file__).resolve().parent / "triton_model.py"  # every Python model's 1/model.py
# Bound of the text-state cache of each Python model that runs the text encoder (the one-hop boot_txt2img,
# the CPU ensemble's text_encoder), bytes per instance; 0 = off. Equal to triton_model.DEFAULT_TEXT_CACHE_BYTES
# (tests/test_text_cache.py), which that file cannot import from here.
TEXT_CACHE_BYTES = 64 << 20
TEXT_MODELS = (ENSEMBLE, "text_encoder")  # where the CPU variants keep the cache
# gpu variant: ONNX Runtime's TensorRT engines and timing cache live here, on a volume that outlives the
# container (deploy/kubernetes/deployment.yaml mounts one): /tmp would rebuild every engine on every restart.
TRT_CACHE_DIR = "/var/cache/boot/trt"
# The TensorRT inside the serving image: a plan only loads in the TensorRT (major.minor) that built it,
# unless it was built version-compatible. NGC release -> TensorRT of nvcr.io/nvidia/tritonserver:<release>-py3.
SERVING_IMAGE = "24.10"
SERVING_TENSORRT = {"24.08": "10.3", "24.09": "10.4", "24.10": "10.5", "24.11": "10.6", "24.12": "10.7"}
HEADER = ("# Generated by `python -m boot_serve.triton_repo` from manifest.json ({variant} variant);\n"
          "# edit boot_serve/triton_repo.py, not this file.\n")

# The shipped shapes student (docs/teacher.md): what the committed configs are generated from.
SHAPES_MANIFEST = {"latent_shape": [4, 16, 16], "image_shape": [64, 64, 3], "max_length": 16,
                   "hidden_size": 384, "max_batch": 8, "precision": "fp32", "guidance_range": [1.0, 6.0],
                   "guidance_scale": 4.5}


class RepositoryError(RuntimeError):
    """The model repository is missing, not exported yet, or incomplete."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def _tensor(name: str, dtype: str, dims, **extra) -> dict:
    return {"name": name, "data_type": f"TYPE_{dtype}", "dims": [int(d) for d in dims], **extra}


def _signatures(m: dict) -> dict[str, tuple[list[dict], list[dict]]]:
    """(inputs, outputs) of every model, per request (Triton adds the batch axis)."""
    C, h, w = m["latent_shape"]
    H, W, _ = m["image_shape"]
    L, D = m["max_length"], m["hidden_size"]
    if "text_embeds_size" in m:
        return _sdxl_signatures(m)
    return {
        ENSEMBLE: ([_tensor("PROMPT", "STRING", [1]), _tensor("SEED", "INT64", [1]),
                    _tensor("GUIDANCE_SCALE", "FP32", [1], optional=True)],
                   [_tensor("IMAGE", "UINT8", [H, W, 3])]),
        "preprocess": ([_tensor("PROMPT", "STRING", [1]), _tensor("SEED", "INT64", [1]),
                        _tensor("GUIDANCE_SCALE", "FP32", [1], optional=True)],
                       [_tensor("input_ids", "INT64", [L]), _tensor("noise", "FP32", [C, h, w]),
                        _tensor("guidance_scale", "FP32", [1])]),
        "text_encoder": ([_tensor("input_ids", "INT64", [L])], [_tensor("text_states", "FP32", [L, D])]),
        # The graph takes guidance_scale as (B,): one scalar per request, hence the reshape.
        "boot_unet": ([_tensor("noise", "FP32", [C, h, w]), _tensor("text_states", "FP32", [L, D]),
                       _tensor("guidance_scale", "FP32", [1], reshape={"shape": []})],
                      [_tensor("latents", "FP32", [C, h, w])]),
        "vae_decoder": ([_tensor("latents", "FP32", [C, h, w])], [_tensor("image", "UINT8", [H, W, 3])]),
    }


def _sdxl_signatures(m: dict) -> dict[str, tuple[list[dict], list[dict]]]:
    """_signatures with the SDXL family's second token ids and pooled text_embeds added."""
    sig = {name: (list(inputs), list(outputs)) for name, (inputs, outputs) in
           _signatures({k: v for k, v in m.items() if k != "text_embeds_size"}).items()}
    L, P = m["max_length"], m["text_embeds_size"]
    sig["preprocess"][1].insert(1, _tensor("input_ids_2", "INT64", [L]))
    sig["text_encoder"][0].append(_tensor("input_ids_2", "INT64", [L]))
    sig["text_encoder"][1].append(_tensor("text_embeds", "FP32", [P]))
    sig["boot_unet"][0].append(_tensor("text_embeds", "FP32", [P]))
    return sig


def _ensemble_steps(sdxl: bool = False) -> list[dict]:
    def step(model, inputs, outputs):
        return {"model_name": model, "model_version": -1,
                "input_map": {k: k for k in inputs}, "output_map": {k: v or k for k, v in outputs.items()}}

    ids, embeds = (["input_ids", "input_ids_2"], ["text_embeds"]) if sdxl else (["input_ids"], [])
    return [
        step("preprocess", ["PROMPT", "SEED", "GUIDANCE_SCALE"], dict.fromkeys([*ids, "noise", "guidance_scale"])),
        step("text_encoder", ids, dict.fromkeys(["text_states", *embeds])),
        step("boot_unet", ["noise", "text_states", "guidance_scale", *embeds], {"latents": "latents"}),
        step("vae_decoder", ["latents"], {"image": "IMAGE"}),
    ]


def _graph_dims(tensor: dict) -> list[int]:
    """Per-request dims as the graph sees them (`reshape` where the config has one)."""
    return list(tensor["reshape"].get("shape", [])) if "reshape" in tensor else list(tensor["dims"])


def _trt_profile(inputs: list[dict], max_batch: int) -> dict[str, str]:
    """TensorRT EP shape profile over the batch axis, "name:1x16,other:1x4x8x8"."""
    def shapes(batch):
        return ",".join(f"{t['name']}:" + "x".join(str(d) for d in [batch, *_graph_dims(t)]) for t in inputs)

    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(min(TRT_OPT_BATCH, max_batch)),
            "trt_profile_max_shapes": shapes(max_batch)}


def resolve_variant(variant: str) -> str:
    """A variant name as written into the configs: `cpu` is DEFAULT_CPU_VARIANT."""
    variant = DEFAULT_CPU_VARIANT if variant == "cpu" else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {('cpu', *VARIANTS)}, got {variant!r}")
    return variant


def _python_cpu(instances: int, onnx_params: bool, text_cache_bytes: int | None = None) -> dict:
    """Config fields of a Python-backend model on the CPU; the ONNX Runtime settings where it runs graphs,
    the text-state cache bound where it runs the text encoder."""
    cfg: dict = {"backend": "python", "instance_group": [{"kind": "KIND_CPU", "count": instances}]}
    if onnx_params:
        cfg["parameters"] = {"onnx_file": {"string_value": "model.onnx"},
                             "providers": {"string_value": "CPUExecutionProvider"},
                             "intra_op_thread_count": {"string_value": "0"}}
    if text_cache_bytes is not None:
        cfg["parameters"]["text_cache_bytes"] = {"string_value": str(int(text_cache_bytes))}
    return cfg


def _guidance_parameters(manifest: dict) -> dict:
    """What a client cannot learn otherwise (the demo's guidance slider): the student's range."""
    if "guidance_range" not in manifest:
        return {}
    lo, hi = (float(v) for v in manifest["guidance_range"])
    w = float(manifest.get("guidance_scale", lo))
    return {k: {"string_value": f"{v:g}"} for k, v in (("guidance_min", lo), ("guidance_max", hi),
                                                         ("guidance_scale", w))}


def _onehop_config(manifest: dict, batch: int, instances: int, delay_us: int,
                   text_cache_bytes: int = TEXT_CACHE_BYTES) -> dict:
    """boot_txt2img as one Python model serving the whole request (cpu-onehop)."""
    inputs, outputs = _signatures(manifest)[ENSEMBLE]
    cfg = {"name": ENSEMBLE, "max_batch_size": batch, "input": inputs, "output": outputs,
           **_python_cpu(instances, onnx_params=True, text_cache_bytes=text_cache_bytes),
           "dynamic_batching": {"max_queue_delay_microseconds": delay_us}}
    params = cfg["parameters"]
    del params["onnx_file"]  # the graphs are the composing models' files, paths from manifest.json "graphs"
    params.update(_guidance_parameters(manifest))
    return cfg


def _trt_precision(manifest: dict, name: str) -> dict[str, str]:
    """TensorRT EP precision of the gpu variant. fp16 export: FP16 kernels allowed, layer norms kept in
    fp32. ONNX Runtime builds weakly typed TensorRT networks, so the other fp32 islands of the fp16 export
    (time embedding, post-processing) may still run in fp16 there; the tensorrt variant's plans are strongly
    typed and keep every one of them (export --tensorrt --precision fp16)."""
    # Per graph: export --vae-precision fp32 keeps the VAE decoder fp32 inside an fp16 export.
    if manifest.get("graphs", {}).get(name, {}).get("precision", manifest.get("precision")) != "fp16":
        return {"precision_mode": "FP32"}
    return {"precision_mode": "FP16", "trt_layer_norm_fp32_fallback": "1"}


def check_plan_version(manifest: dict, serving_tensorrt: str) -> None:
    """RepositoryError unless the plans load in a server with TensorRT `serving_tensorrt` (major.minor)."""
    info = manifest.get("tensorrt", {})
    built = ".".join(str(info.get("version", "?")).split(".")[:2])
    if info.get("version_compatible") or built == serving_tensorrt:
        return
    raise RepositoryError(
        f"the TensorRT plans were built with TensorRT {info.get('version', 'of unknown version')}; the serving "
        f"image runs TensorRT {serving_tensorrt} (nvcr.io/nvidia/tritonserver:{SERVING_IMAGE}-py3 has "
        f"{SERVING_TENSORRT[SERVING_IMAGE]}) and refuses plans from another version. Build them with that "
        f"TensorRT (inside nvcr.io/nvidia/tensorrt:{SERVING_IMAGE}-py3, or pip install "
        f"'tensorrt=={serving_tensorrt}.*'), or give --serving-tensorrt {built} for a server that has it")


def model_configs(manifest: dict, variant: str = "cpu", max_batch_size: int | None = None,
                  queue_delay_us: dict[str, int] | None = None, instances: int | None = None,
                  gpus: tuple[int, ...] | None = None, trt_cache_dir: str = TRT_CACHE_DIR,
                  serving_tensorrt: str = SERVING_TENSORRT[SERVING_IMAGE],
                  text_cache_bytes: int = TEXT_CACHE_BYTES) -> dict:
    """ModelConfig protobufs of every model of the repository, by name.

    `instances`: instance_group count, i.e. copies of each model per device (None: ONEHOP_INSTANCES
    of the one-hop boot_txt2img, 1 of every other model). `gpus` (gpu and
    tensorrt variants): the GPU ids to place those copies on, `instances` on each (Triton's
    instance_group `gpus`); None = every GPU the server sees. `queue_delay_us`: per model name
    (cpu-onehop: the key boot_txt2img sets its delay). `trt_cache_dir` (gpu): where ONNX Runtime keeps
    TensorRT engines and its timing cache. `serving_tensorrt` (tensorrt): the server's TensorRT
    major.minor; plans from another version are refused (check_plan_version). `text_cache_bytes` (cpu
    variants): bound of the text-state cache of the model that runs the text encoder, bytes per instance,
    0 = off (boot_serve/triton_model.py).
    """
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    variant = resolve_variant(variant)
    onehop_instances = ONEHOP_INSTANCES if instances is None else instances
    instances = 1 if instances is None else instances
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if int(text_cache_bytes) < 0:
        raise ValueError(f"text_cache_bytes must be >= 0 (0: no text-state cache), got {text_cache_bytes}")
    if any(int(v) < 0 for v in (queue_delay_us or {}).values()):
        raise ValueError(f"queue delays must be >= 0 microseconds, got {queue_delay_us}")
    if gpus is not None and (variant in CPU_VARIANTS or not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus)):
        raise ValueError(f"gpus must be distinct GPU ids >= 0 and needs the gpu or tensorrt variant, got {gpus} "
                         f"for {variant}")
    gpu_group = {"kind": "KIND_GPU", "count": instances, **({"gpus": list(gpus)} if gpus else {})}
    batch = int(max_batch_size or max(MIN_MAX_BATCH, int(manifest.get("max_batch", MIN_MAX_BATCH))))
    if batch < MIN_MAX_BATCH:
        raise ValueError(f"max_batch_size must be >= {MIN_MAX_BATCH}, got {batch}")
    if variant == "tensorrt":
        plans = manifest.get("tensorrt", {}).get("plans", {})
        missing = [m for m in HEAVY_MODELS if m not in plans]
        if missing:
            raise RepositoryError(f"the tensorrt variant needs TensorRT plans for {', '.join(missing)}: "
                                  "export with `python -m boot_serve.export --tensorrt` on the GPU machine")
        check_plan_version(manifest, serving_tensorrt)
        batch = min(batch, min(int(plans[m]["profile"]["max"]) for m in HEAVY_MODELS))
        if batch < MIN_MAX_BATCH:
            raise RepositoryError(f"the TensorRT plans take batches up to {batch}; the client contract needs "
                                  f"{MIN_MAX_BATCH}: export with --tensorrt --max-batch {MIN_MAX_BATCH} or more")
    cpu = variant in CPU_VARIANTS
    delays = {**(CPU_QUEUE_DELAY_US if cpu else QUEUE_DELAY_US), ENSEMBLE: 0, **(queue_delay_us or {})}
    configs = {}
    for name, (inputs, outputs) in _signatures(manifest).items():
        cfg: dict = {"name": name, "max_batch_size": batch, "input": inputs, "output": outputs}
        if name == ENSEMBLE and variant == ONEHOP:
            cfg = _onehop_config(manifest, batch, onehop_instances, int(delays[ENSEMBLE]), text_cache_bytes)
        elif name == ENSEMBLE:
            # Batching happens in each composing model: the ensemble forwards every request.
            steps = _ensemble_steps(sdxl="text_embeds_size" in manifest)
            cfg.update(platform="ensemble", ensemble_scheduling={"step": steps})
            if params := _guidance_parameters(manifest):
                cfg["parameters"] = params
        elif name in PYTHON_MODELS or cpu:
            cfg.update(_python_cpu(instances, onnx_params=name in HEAVY_MODELS,
                                   text_cache_bytes=text_cache_bytes if name in TEXT_MODELS else None))
        elif variant == "gpu":
            trt = {**_trt_precision(manifest, name), "max_workspace_size_bytes": str(4 << 30),
                   "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"{trt_cache_dir}/{name}",
                   "trt_timing_cache_enable": "1", "trt_timing_cache_path": trt_cache_dir,
                   **_trt_profile(inputs, batch)}
            cfg.update(platform="onnxruntime_onnx", backend="onnxruntime", default_model_filename="model.onnx",
                       instance_group=[gpu_group],
                       optimization={"execution_accelerators": {"gpu_execution_accelerator": [
                           {"name": "tensorrt", "parameters": trt}]}})
        else:  # tensorrt plans
            plan = Path(manifest["tensorrt"]["plans"][name]["path"]).name
            cfg.update(platform="tensorrt_plan", backend="tensorrt", default_model_filename=plan,
                       instance_group=[gpu_group])
        if name != ENSEMBLE:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": int(delays[name])}
        configs[name] = json_format.ParseDict(cfg, model_config_pb2.ModelConfig())
    return configs


def render(config, variant: str = "cpu") -> str:
    from google.protobuf import text_format

    text = text_format.MessageToString(config, use_short_repeated_primitives=True)
    return HEADER.format(variant=resolve_variant(variant)) + text


def parse_config(text: str):
    """A config.pbtxt as a ModelConfig protobuf; raises text_format.ParseError when invalid."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_configs(repository: str | Path, variant: str = "cpu", manifest: dict | None = None,
                  **options) -> list[Path]:
    """Write every config.pbtxt of `repository` (and the Python models it needs) from its
    manifest.json; returns the files written. `options` go to `model_configs`."""
    repo = Path(repository)
    if manifest is None:
        manifest = read_manifest(repo)
    written = []
    variant = resolve_variant(variant)
    for name, config in model_configs(manifest, variant, **options).items():
        folder = repo / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(render(config, variant))
        written.append(folder / "config.pbtxt")
        dst = folder / "1" / "model.py"
        if config.backend == "python":
            if MODEL_SOURCE.read_bytes() != (dst.read_bytes() if dst.is_file() else b""):
                shutil.copyfile(MODEL_SOURCE, dst)
                written.append(dst)
        elif dst.is_file() and dst.read_bytes() == MODEL_SOURCE.read_bytes():
            dst.unlink()  # boot_txt2img back to the ensemble: its one-hop model.py goes
            written.append(dst)
    return written


# --------------------------------------------------------------------------------------------
# Repository check (the launcher runs it before starting tritonserver)
# --------------------------------------------------------------------------------------------
def read_manifest(repository: str | Path) -> dict:
    repo = Path(repository)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist. Create it with "
                              f"`python -m boot_serve.export --student <student folder> --repository {repo}`")
    path = repo / MANIFEST
    if not path.is_file():
        raise RepositoryError(f"{repo} has no {MANIFEST}: it has not been exported yet. Run "
                              f"`python -m boot_serve.export --student <student folder> --repository {repo}`")
    return json.loads(path.read_text())


def batching_models(variant: str) -> tuple[str, ...]:
    """The models of `variant` that run graphs, each batching dynamically: where to look in Triton's
    statistics for batch sizes."""
    return (ENSEMBLE,) if resolve_variant(variant) == ONEHOP else HEAVY_MODELS


def served_variant(repository: str | Path) -> str:
    """The variant the repository's configs were written for (from the header of boot_txt2img's
    config.pbtxt; "unknown" for configs written otherwise)."""
    path = Path(repository) / ENSEMBLE / "config.pbtxt"
    first = path.read_text().splitlines()[0] if path.is_file() else ""
    found = [v for v in VARIANTS if f"({v} variant)" in first]
    return found[0] if found else "unknown"


def check_repository(repository: str | Path) -> dict:
    """Raise RepositoryError naming what is missing; return the manifest."""
    repo = Path(repository)
    manifest = read_manifest(repo)
    problems = []
    for name in MODELS:
        config_path = repo / name / "config.pbtxt"
        if not config_path.is_file():
            problems.append(f"{name}/config.pbtxt is missing (write it: python -m boot_serve.triton_repo "
                            f"--repository {repo})")
            continue
        try:
            config = parse_config(config_path.read_text())
        except Exception as err:  # noqa: BLE001 - protobuf's ParseError, reported with the file
            problems.append(f"{config_path} is not a valid Triton ModelConfig: {err}")
            continue
        version = repo / name / "1"
        if config.backend == "python" and not (version / "model.py").is_file():
            problems.append(f"{name}/1/model.py is missing")
        if name in HEAVY_MODELS:
            weights = config.default_model_filename or "model.onnx"
            if config.backend == "python":
                onnx_file = config.parameters["onnx_file"].string_value if "onnx_file" in config.parameters else ""
                weights = onnx_file or "model.onnx"
            if not (version / weights).is_file():
                problems.append(f"{name}/1/{weights} is missing (not exported yet?)")
    for key in ("tokenizer", "tokenizer_2"):
        if key == "tokenizer_2" and key not in manifest:
            continue
        tokenizer = repo / manifest.get(key, "text_encoder/1/tokenizer") / "tokenizer.json"
        if not tokenizer.is_file():
            problems.append(f"{tokenizer.relative_to(repo)} is missing")
    if problems:
        raise RepositoryError(f"model repository {repo} is incomplete:\n  - " + "\n  - ".join(problems) + "\n"
                              f"Re-run `python -m boot_serve.export --student <student folder> --repository {repo}`.")
    return manifest


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU ids like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m boot_serve.triton_repo",
                                description="Write the config.pbtxt files of a boot repository from its manifest.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="repository holding manifest.json")
    p.add_argument("--variant", choices=("cpu", *VARIANTS), default="cpu",
                   help=f"cpu-onehop: one Python-backend model serves the whole request (ONNX Runtime); "
                        "cpu-ensemble: the 4-model ensemble of Python-backend models; cpu: the default CPU "
                        f"variant ({DEFAULT_CPU_VARIANT}); gpu: onnxruntime backend + TensorRT EP; "
                        "tensorrt: TensorRT plans built by `export --tensorrt`")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help=f"max_batch_size of every model (default: manifest max_batch, at least {MIN_MAX_BATCH})")
    p.add_argument("--instances", type=int, default=None,
                   help=f"instances of every model per device (instance_group count; default {ONEHOP_INSTANCES} of the "
                        "one-hop boot_txt2img, 1 of every other model)")
    p.add_argument("--gpus", type=_gpu_list, default=None,
                   help="gpu/tensorrt variants: comma-separated GPU ids to spread the instances over, "
                        "--instances on each, e.g. 0,1,2,3 (default: every GPU the server sees). TensorRT plans "
                        "only run on the GPU model they were built on")
    p.add_argument("--queue-delay-us", type=int, default=None,
                   help="max_queue_delay_microseconds of every batching model (default: 0 for the cpu variants; "
                        f"per model for gpu/tensorrt: {', '.join(f'{k} {v}' for k, v in QUEUE_DELAY_US.items())})")
    p.add_argument("--trt-cache-dir", default=TRT_CACHE_DIR,
                   help="gpu variant: directory of ONNX Runtime's TensorRT engine and timing caches (one writer "
                        "only: in Kubernetes a per-pod emptyDir, deploy/README.md)")
    p.add_argument("--serving-tensorrt", default=SERVING_TENSORRT[SERVING_IMAGE],
                   help="tensorrt variant: TensorRT major.minor of the server that loads the plans (default: that "
                        f"of nvcr.io/nvidia/tritonserver:{SERVING_IMAGE}-py3); plans built by another are refused")
    p.add_argument("--text-cache-bytes", type=int, default=TEXT_CACHE_BYTES,
                   help="cpu variants: bound of the text-state cache (a repeated prompt skips the text encoder) in "
                        "bytes per instance of the model that runs the text encoder; 0 turns it off")
    p.add_argument("--shapes-defaults", action="store_true",
                   help="no manifest needed: use the shipped shapes student's dims (regenerates the committed configs)")
    args = p.parse_args(argv)
    try:
        manifest = SHAPES_MANIFEST if args.shapes_defaults else read_manifest(args.repository)
        files = write_configs(args.repository, args.variant, manifest, max_batch_size=args.max_batch_size,
                              instances=args.instances, gpus=args.gpus, trt_cache_dir=args.trt_cache_dir,
                              serving_tensorrt=args.serving_tensorrt, text_cache_bytes=args.text_cache_bytes,
                              queue_delay_us=None if args.queue_delay_us is None
                              else dict.fromkeys((ENSEMBLE, *QUEUE_DELAY_US), args.queue_delay_us))
    except (RepositoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
