"""The student folder a run writes (docs/interfaces.md "Student folder"): boot.json with the recipe
and lineage, the UNet, the teacher's parts, the diffusers pipeline files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from boot import method as boot
from boot.folders import (
    STUDENT_META,
)
from distill import diffusers_folder
from distill.config import RunConfig
from distill.loading import Teacher


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("boot")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        if pyproject.is_file():
            import tomllib

            return tomllib.loads(pyproject.read_text())["project"]["version"]
        return "unknown"


def student_meta(cfg: RunConfig, teacher: Teacher, prompts_info: dict, steps: int, w: float,
                 extra: dict, conditioning: str = boot.DEFAULT_CONDITIONING,
                 guidance_band: float | None = None) -> dict:
    """boot.json (docs/interfaces.md "Student folder")."""
    meta = {
        "format": "boot-student/1",
        "teacher": cfg.teacher,
        "prompts": prompts_info,
        "hyperparameters": dataclasses.asdict(cfg),
        "steps": steps,
        "weights": "ema" if cfg.ema > 0 else "online",
        "prediction_type": teacher.prediction_type,
        "input_timestep": boot.unet_input_timestep(
            cfg.parameterization, int(teacher.scheduler_config.get("num_train_timesteps", 1000)) - 1),
        "parameterization": cfg.parameterization,
        **({"update_scale": boot.update_scale(boot.NoiseSchedule.from_scheduler_config(teacher.scheduler_config),
                                              teacher.prediction_type, cfg.parameterization)}
           if cfg.parameterization == "preconditioned" else {}),
        "guidance_range": [cfg.guidance_min, cfg.guidance_max],
        "guidance_scale": w,
        "latent_shape": list(teacher.latent_shape),
        "image_shape": list(teacher.image_shape),
        "conditioning": boot.conditioning_record(conditioning, guidance_band),
        "package_version": package_version(),
        **extra,
    }
    if "text_encoder" in teacher.meta:
        meta["text_encoder"] = teacher.meta["text_encoder"]
    if teacher.time_ids is not None:  # SDXL family (boot.sdxl)
        meta["added_conditioning"] = {"type": "text_time", "time_ids": teacher.time_ids.int().tolist(),
                                      "text_embeds_size": teacher.text.text_encoder.pooled_size}
    return meta


def lineage(cfg: RunConfig, work: Path, steps: int, fresh: bool = False) -> dict:
    """With --init-from: the starting student's boot.json (kept in `work` when a run starts, so that
    writing over that same folder does not lose it; a resumed run keeps what its start kept, a fresh
    run in a used work folder keeps its own) and the steps of the whole chain."""
    if not cfg.init_from:
        return {}
    kept = work / "init_from.json"
    if fresh or not kept.is_file():
        source = Path(cfg.init_from) / STUDENT_META
        kept.write_text(source.read_text() if source.is_file() else "{}")
    prior = json.loads(kept.read_text())
    if not prior:  # a student folder without boot.json: its history is unknown
        return {"continued_from": None}
    return {"continued_from": prior, "steps_total": prior.get("steps_total", prior["steps"]) + steps}


def write_student(out: Path, teacher: Teacher, unet: torch.nn.Module, meta: dict, work: Path) -> Path:
    """Write the student folder under a temporary name and rename it into place; it is also a
    diffusers pipeline folder where diffusers can run the student (distill.diffusers_folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    boot.save_student_unet(unet, tmp / "unet")
    for part in ("vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if (teacher.folder / part).is_dir():
            shutil.copytree(teacher.folder / part, tmp / part)
    for png in ("samples.png", "loss.png"):
        if (work / png).is_file():
            shutil.copy(work / png, tmp / png)
    (tmp / STUDENT_META).write_text(json.dumps(meta, indent=1))
    diffusers_folder.write_student_files(tmp, teacher.folder, teacher.scheduler_config)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_unet_weights(folder: Path) -> dict:
    """A state dict as boot.save_student_unet wrote it (with the t weights of a "diffusers-guidance" UNet)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if (folder / boot.TIME_WEIGHTS).is_file():
        weights.update(load_file(str(folder / boot.TIME_WEIGHTS)))
    return weights


def update_student_meta(out: Path, **fields) -> None:
    meta = json.loads((out / STUDENT_META).read_text())
    meta.update(fields)
    tmp = out / f".{STUDENT_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / STUDENT_META)

