"""The student folder a run writes (docs/interfaces.md "Student folder"): boot.json with the recipe
and lineage, the UNet, the teacher's parts, the diffusers pipeline files."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from boot.conditioning import TIME_WEIGHTS, conditioning_record, convert_conditioning, save_student_unet
from boot.folders import (
    STUDENT_META,
)
from boot.method import (
    DEFAULT_CONDITIONING,
    NoiseSchedule,
    Student,
    parameterization_name,
    to_plain_projection,
    unet_conditioning,
    unet_guidance_band,
    unet_input_timestep,
    update_scale,
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


@dataclass
class SavedForm:
    """A student as its folder holds it: `student` reads the UNet that is written, `record` holds the boot.json
    fields that describe that UNet ("conditioning", and "lora" for a merged LoRA student)."""

    student: Student
    record: dict


def saved_form(student: Student, cfg: RunConfig) -> SavedForm:
    """The student as write_student will write it, built beside the training modules and leaving them as they are:
    a LoRA student's adapters merged into a plain UNet (distill.lora.merged), a SinusoidSpaceProjection as the
    plain projection it equals (boot.method.to_plain_projection), and a new "diffusers-guidance" student trained as a
    "sinusoid" one converted (boot.conditioning.convert_conditioning, its fit recorded), read by a Student built on
    that UNet.

    Everything a run scores renders this form: the sample grids, the validation that picks the --keep best step
    and the end-of-run evaluation, and the folder is written from it, so each reports what
    BootPipeline.from_pretrained(out) computes. Without LoRA only the time embedding is copied; every other weight
    is shared with `student` (render the form, then drop it; do not train or move it)."""
    record = {}
    if cfg.lora_rank:  # W + (α/r)·B·A into a plain UNet: the folder is an ordinary student's
        from distill import lora

        record["lora"] = {"rank": cfg.lora_rank, "target_modules": list(lora.TARGET_MODULES), "merged": True}
        unet = lora.merged(student.unet)
    else:
        unet = copy_time_embedding(student.unet)
    to_plain_projection(unet)  # a SinusoidSpaceProjection is saved as the GuidanceTimeProjection it equals
    kind = unet_conditioning(unet)
    conditioning = conditioning_record(kind, unet_guidance_band(unet))
    if kind != cfg.conditioning and not cfg.init_from:  # trained as a "sinusoid" student (--condition-space sinusoid)
        fit = convert_conditioning(unet, (cfg.guidance_min, cfg.guidance_max))
        conditioning = {**conditioning_record(cfg.conditioning), "trained_as": {**conditioning, "fit": fit}}
    record["conditioning"] = conditioning
    form = Student(unet.eval(), student.schedule, student.prediction_type, student.parameterization,
                   student.time_ids)
    return SavedForm(form, record)


def copy_time_embedding(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of `unet` with its own time embedding (where the conditioning forms differ) that shares every other
    parameter and buffer with it."""
    shared = {id(t): t for name, t in itertools.chain(unet.named_parameters(), unet.named_buffers())
              if not name.startswith("time_embedding.")}
    return copy.deepcopy(unet, shared)


def student_meta(cfg: RunConfig, teacher: Teacher, prompts_info: dict, steps: int, w: float,
                 extra: dict, form: dict | None = None) -> dict:
    """boot.json (docs/interfaces.md "Student folder"); `form`: SavedForm.record of the UNet written (default:
    a "diffusers-guidance" student's conditioning)."""
    meta = {
        "format": "boot-student/1",
        "teacher": cfg.teacher,
        "prompts": prompts_info,
        "hyperparameters": dataclasses.asdict(cfg),
        "steps": steps,
        "weights": "ema" if cfg.ema > 0 else "online",
        "prediction_type": teacher.prediction_type,
        "input_timestep": unet_input_timestep(
            cfg.parameterization, int(teacher.scheduler_config.get("num_train_timesteps", 1000)) - 1),
        "parameterization": parameterization_name(cfg.parameterization),
        **({"update_scale": update_scale(NoiseSchedule.from_scheduler_config(teacher.scheduler_config),
                                         teacher.prediction_type, cfg.parameterization)}
           if parameterization_name(cfg.parameterization) == "teacher-at-T-scaled-lr" else {}),
        **({"compact": cfg.compact} if cfg.compact else {}),
        "guidance_range": [cfg.guidance_min, cfg.guidance_max],
        "guidance_scale": w,
        "latent_shape": list(teacher.latent_shape),
        "image_shape": list(teacher.image_shape),
        "conditioning": conditioning_record(DEFAULT_CONDITIONING),
        **(form or {}),
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
    save_student_unet(unet, tmp / "unet")
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
    """A state dict as boot.conditioning.save_student_unet wrote it (with the t weights of a "diffusers-guidance"
    UNet)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if (folder / TIME_WEIGHTS).is_file():
        weights.update(load_file(str(folder / TIME_WEIGHTS)))
    return weights


def update_student_meta(out: Path, **fields) -> None:
    meta = json.loads((out / STUDENT_META).read_text())
    meta.update(fields)
    tmp = out / f".{STUDENT_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / STUDENT_META)

