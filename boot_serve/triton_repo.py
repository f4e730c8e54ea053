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
`1/model.py` with the module it imports beside it (MODEL_FILES). preprocess and the ensemble are the
same in every ensemble variant. The ensemble is a chain:
preprocess -> text_encoder -> boot_unet -> vae_decoder. preprocess is the only step that
rejects requests, and no other step holds a request while it does (Triton 2.51 mishandles a
request failed by one of two parallel ensemble steps: hangs, reads of freed inputs).
In the CPU variants the model that runs the text encoder (cpu-onehop: boot_txt2img, cpu-ensemble:
text_encoder) keeps a text-state cache, so a repeated prompt skips the text encoder: config parameter
`text_cache_bytes` (--text-cache-bytes, bytes per instance, default TEXT_CACHE_BYTES, 0 = off).

The configs are generated from manifest.json by boot_serve.triton_configs. The configs committed in
model_repository/ are its output for the shipped shapes student (`SHAPES_MANIFEST`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from boot_serve.triton_configs import (
    DEFAULT_CPU_VARIANT,
    ENSEMBLE,
    HEAVY_MODELS,
    MIN_MAX_BATCH,
    MODELS,
    ONEHOP,
    ONEHOP_INSTANCES,
    QUEUE_DELAY_US,
    SERVING_IMAGE,
    SERVING_TENSORRT,
    TEXT_CACHE_BYTES,
    TRT_CACHE_DIR,
    VARIANTS,
    RepositoryError,
    model_configs,
    parse_config,
    render,
    resolve_variant,
)

MANIFEST = "manifest.json"
HERE = Path(__file__).resolve().parent
MODEL_SOURCE = HERE / "triton_model.py"  # every Python model's 1/model.py
# What a Python model's version folder holds: model.py and the modules it imports beside it, each a copy
# of its source here, unchanged (Triton imports model.py as `1.model`, so its relative imports find them).
MODEL_FILES = {"model.py": MODEL_SOURCE, "triton_text_cache.py": HERE / "triton_text_cache.py"}

# The shipped shapes student (docs/teacher.md): what the committed configs are generated from.
SHAPES_MANIFEST = {"latent_shape": [4, 16, 16], "image_shape": [64, 64, 3], "max_length": 16,
                   "hidden_size": 384, "max_batch": 8, "precision": "fp32", "guidance_range": [1.0, 6.0],
                   "guidance_scale": 4.5}


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
        for filename, source in MODEL_FILES.items():
            dst = folder / "1" / filename
            if config.backend == "python":
                if source.read_bytes() != (dst.read_bytes() if dst.is_file() else b""):
                    shutil.copyfile(source, dst)
                    written.append(dst)
            elif dst.is_file() and dst.read_bytes() == source.read_bytes():
                dst.unlink()  # boot_txt2img back to the ensemble: its one-hop model.py (and siblings) go
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
        if config.backend == "python":
            problems += [f"{name}/1/{filename} is missing" for filename in MODEL_FILES
                         if not (version / filename).is_file()]
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
