"""Average the UNet weights of several students of one lineage into a new student folder (a weight soup).

    python -m boot_tools.soup OUT BASE_STUDENT SOURCE [SOURCE ...] [--online]

OUT is a copy of BASE_STUDENT (its VAE, scheduler and boot.json) whose UNet is the element-wise mean,
in float32, of the SOURCEs: student folders (their unet/) or `distill.run` checkpoint folders
(checkpoints/step-N: their EMA weights, or with --online the online student's), each put in the form its
run writes a student folder in first (distill.student_folder.saved_form: a LoRA student merged, a student
trained in the sinusoid space converted to the diffusers conditioning it is saved in), so that a
checkpoint's EMA at the run's last step gives the run's own folder (bit for bit at the run's thread count).
Sources must share the UNet architecture; averaging only makes sense for students fine-tuned from a common
start (docs/ablations.md).
boot.json gains a "soup" entry naming the sources.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from boot import checkpoint
from boot.conditioning import save_student_unet
from boot.method import NoiseSchedule

UNET = "unet/diffusion_pytorch_model.safetensors"


def weights(source: Path, online: bool = False, teacher: Path | None = None) -> dict[str, torch.Tensor]:
    """The UNet weights of a student folder, or of a checkpoint as its run would write them to one."""
    if (source / UNET).exists():
        return {k: v.float() for k, v in load_file(source / UNET).items()}
    module = "unet" if online else "ema"
    state = checkpoint.module_state(source, module) if (source / "tensors.safetensors").is_file() else {}
    if not state:
        raise SystemExit(f"{source}: neither a student folder ({UNET}) nor a checkpoint with "
                         f"{'online' if online else 'EMA'} weights")
    return {k: v.float() for k, v in saved_weights(source, state, teacher).items()}


def saved_weights(source: Path, state: dict[str, torch.Tensor], teacher: Path | None = None) -> dict[str, torch.Tensor]:
    """`state`, the training form of a UNet in checkpoint `source`, as its run writes it to a student folder's
    unet/: the student is rebuilt from the checkpoint's recorded config and teacher, given `state`, put through
    saved_form and saved (the time weights beside it are the base student's)."""
    from distill.config import RunConfig
    from distill.loading import build_student, load_teacher
    from distill.loop import PREDATING, training_conditioning
    from distill.student_folder import saved_form

    stored = {**PREDATING, **json.loads((source / "meta.json").read_text())["meta"]["config"]}
    cfg = RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
                       if k in RunConfig.__dataclass_fields__})
    folder = Path(teacher or cfg.teacher)
    if not folder.is_dir():
        raise SystemExit(f"{source}: its run's teacher {folder} is not here; run from the folder the run ran in "
                         "or pass --teacher")
    model = load_teacher(folder)
    schedule = NoiseSchedule.from_scheduler_config(model.scheduler_config)
    projected = (cfg.guidance_min, cfg.guidance_max) if cfg.condition_space == "projected" else None
    student = build_student(model, schedule, cfg.init_from, cfg.parameterization, cfg.lora_rank,
                            training_conditioning(cfg), cfg.guidance_band, projected, cfg.compact)
    student.unet.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:  # the weights file exactly as write_student writes it
        save_student_unet(saved_form(student, cfg).student.unet, Path(tmp) / "unet")
        return load_file(Path(tmp) / UNET)


def soup(out: Path, base: Path, sources: list[Path], online: bool = False, teacher: Path | None = None) -> None:
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    mean = weights(sources[0], online, teacher)
    for source in sources[1:]:
        w = weights(source, online, teacher)
        if w.keys() != mean.keys() or any(w[k].shape != mean[k].shape for k in mean):
            raise SystemExit(f"{source}: UNet weights differ in names or shapes from {sources[0]}")
        for k in mean:
            mean[k] += w[k]
    shutil.copytree(base, out)
    save_file({k: (v / len(sources)).contiguous() for k, v in mean.items()}, out / UNET, metadata={"format": "pt"})
    info = json.loads((out / "boot.json").read_text())
    info["soup"] = [str(s) for s in sources]
    if online:
        info["soup_checkpoint_weights"] = "online"
    (out / "boot.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{out}: mean of {len(sources)} UNets")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="new student folder (must not exist)")
    p.add_argument("base", type=Path, help="student folder copied for everything but the UNet weights")
    p.add_argument("sources", type=Path, nargs="+", help="student folders or distill.run checkpoint folders")
    p.add_argument("--online", action="store_true",
                   help="take a checkpoint's online student instead of its EMA (student folders are as written)")
    p.add_argument("--teacher", type=Path, help="the teacher folder of checkpoint sources (default: the one "
                   "their run recorded, relative to where it ran)")
    args = p.parse_args(argv)
    soup(args.out, args.base, args.sources, args.online, args.teacher)


if __name__ == "__main__":
    main()
