"""The repository an export installs: the manifest, the tokenizer(s), and the staged, atomic install."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from pathlib import Path

from boot_serve.export.graphs import Student
from boot_serve.export.spec import DATA_SUFFIX, MANIFEST, MANIFEST_FORMAT, MODELS, TOKENIZER_2_DIR, TOKENIZER_DIR


def graph_info(path: Path, repo_root: Path) -> dict:
    """Names, dtypes and shapes (batch as "B") of a graph's inputs and outputs, its files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param and "B" or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    data = path.with_name(path.name + DATA_SUFFIX)
    files = [path] + ([data] if data.is_file() else [])
    return {"path": path.relative_to(repo_root).as_posix(),
            "external_data": data.relative_to(repo_root).as_posix() if data.is_file() else None,
            "bytes": sum(f.stat().st_size for f in files), "opset": model.opset_import[0].version,
            "inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("boot", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "diffusers", "transformers",
                "tokenizers", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def write_tokenizer(student: Student, folder: Path, tok=None) -> None:
    """The student's tokenizer files (or those of `tok`, SDXL's second), with padding and truncation
    to max_length written into tokenizer.json, so `tokenizers.Tokenizer.from_file` alone reproduces
    `tokenizer(prompts, padding="max_length", max_length=L, truncation=True)`."""
    from tokenizers import Tokenizer

    tok = tok or student.pipe.text.tokenizer
    if not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"the student's tokenizer {type(tok).__name__} is not a fast tokenizer")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=student.max_length, direction=tok.truncation_side)
    backend.enable_padding(length=student.max_length, pad_id=tok.pad_token_id, pad_token=tok.pad_token,
                           pad_type_id=tok.pad_token_type_id, direction=tok.padding_side)
    backend.save(str(folder / "tokenizer.json"))


def manifest(student: Student, stage: Path, precision: str, max_batch: int, opset: int) -> dict:
    meta = student.pipe.meta
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_student": str(student.folder),
        "student": {**{k: meta.get(k) for k in ("format", "teacher", "prediction_type", "input_timestep", "steps")},
                    "parameterization": student.pipe.generator.student.parameterization},
        "precision": precision,
        "latent_shape": list(student.latent_shape),
        "image_shape": list(student.image_shape),
        "max_length": student.max_length,
        "hidden_size": student.hidden_size,
        "init_noise_sigma": float(student.pipe.init_noise_sigma),
        "guidance_range": [float(v) for v in student.pipe.guidance_range],
        "guidance_scale": float(student.pipe.guidance_scale),
        "max_batch": max_batch,
        "tokenizer": TOKENIZER_DIR,
        **sdxl_manifest(student),
        "exporter": f"torch.onnx.export (TorchScript), opset {opset}",
        "graphs": {m: graph_info(stage / m / "1" / "model.onnx", stage) for m in MODELS},
        "versions": versions(),
    }


def sdxl_manifest(student: Student) -> dict:
    """SDXL family: the second tokenizer, the pooled width and the time ids folded into boot_unet."""
    if student.text_embeds_size is None:
        return {}
    return {"tokenizer_2": TOKENIZER_2_DIR, "text_embeds_size": student.text_embeds_size,
            "time_ids": student.pipe.generator.student.time_ids.int().tolist()}


def stage_dir(repository: Path) -> Path:
    """Staging folder beside the repository (same filesystem, so the final move is a rename;
    outside it, so a polling tritonserver never sees half-written models)."""
    repository.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{repository.name}-export-", dir=repository.parent))


def install(stage: Path, repository: Path) -> None:
    """Step 6: move the staged graphs, plans, tokenizer and manifest into the repository."""
    for model in MODELS:
        dst = repository / model / "1"
        dst.mkdir(parents=True, exist_ok=True)
        # Files this export owns: an older export's weights or engines must not outlive it.
        for stale in [dst / ("model.onnx" + DATA_SUFFIX), *dst.glob("model-trt*.plan")]:
            stale.unlink(missing_ok=True)
        for f in (stage / model / "1").iterdir():
            if f.is_file():
                os.replace(f, dst / f.name)
    for tok_dir in (TOKENIZER_DIR, TOKENIZER_2_DIR):
        tok = repository / tok_dir
        if tok.exists():
            shutil.rmtree(tok)
        if (stage / tok_dir).exists():
            os.replace(stage / tok_dir, tok)
    os.replace(stage / MANIFEST, repository / MANIFEST)

