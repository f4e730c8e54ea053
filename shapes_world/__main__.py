"""Train the shipped "shapes" teacher: an SD-shaped latent text-to-image model (docs/teacher.md).

    python -m shapes_world                       # all stages, resumable; writes pretrained/shapes-teacher
    python -m shapes_world --stage unet          # one stage only
    python -m shapes_world --init-from pretrained/shapes-teacher --out DIR --set unet_batch=512
                                                 # go on training a teacher folder (e.g. on a GPU)

Stages, each resumable from the checkpoints in `--work`:
  1. vae      AutoencoderKL, 64x64x3 <-> 4x16x16, L1 + MSE + a small KL term;
  2. latents  a fixed set of rendered images encoded once (posterior mean and std) plus the
              MiniLM states of every distinct caption: the UNet stage then costs no rendering;
  3. unet     UNet2DConditionModel, v-prediction on a zero-terminal-SNR schedule, min-SNR-5
              loss weights, 10% caption dropout for classifier-free guidance, EMA;
  4. export   a diffusers StableDiffusionPipeline folder (text encoder weights left out: they
              come from the installed MiniLM package) + boot_teacher.json + sample grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from shapes_world import teacher
from shapes_world.recipe import ARCHITECTURE, TeacherConfig, recipe_of

DEFAULT_OUT = Path("pretrained/shapes-teacher")
DEFAULT_WORK = Path("runs/teacher")


def parser() -> argparse.ArgumentParser:
    cfg = TeacherConfig()
    p = argparse.ArgumentParser(prog="python -m shapes_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "vae", "latents", "unet", "export"], default="all",
                   help="stage to run (default: all, each resumed where it stopped)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"checkpoints and logs (default {DEFAULT_WORK})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"pipeline folder (default {DEFAULT_OUT})")
    p.add_argument("--vae-steps", type=int, help=f"VAE steps (default {cfg.vae_steps})")
    p.add_argument("--unet-steps", type=int, help=f"UNet steps (default {cfg.unet_steps})")
    p.add_argument("--dataset-size", type=int, help=f"cached images for the UNet stage (default {cfg.dataset_size})")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a teacher folder to go on training: its recipe (architecture, schedule) is the "
                        "default, its VAE and latent scale are kept, its UNet EMA weights start the UNet; "
                        "training hyperparameters may change with --set, --unet-steps, ... (default: off)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the latents and unet stages (default cpu)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes for the latents stage (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override any recipe field, e.g. --set unet_batch=128 "
                        "--set 'unet_down=[\"CrossAttnDownBlock2D\",\"CrossAttnDownBlock2D\"]' (repeatable)")
    p.add_argument("--fit-minutes", type=float, default=0.0,
                   help="time the first UNet steps, then cut --unet-steps so the stage ends in about this "
                        "many minutes (for a time-limited GPU machine; 0 = off)")
    return p


def recipe(p: argparse.ArgumentParser, args: argparse.Namespace) -> TeacherConfig:
    """The recipe the flags ask for: the defaults (or the --init-from folder's), then the step counts and
    --set overrides, each checked (p.error exits with code 2)."""
    cfg = TeacherConfig()
    kept = None  # the continued folder's recipe, read once
    if args.init_from:
        try:
            cfg = kept = recipe_of(args.init_from)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            p.error(f"--init-from {args.init_from}: not a teacher folder written by python -m shapes_world ({exc})")
    for name in ("vae_steps", "unet_steps", "dataset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "init_from"]
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            p.error(f"--set {item}: unknown recipe field {key!r} (one of {', '.join(fields)})")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        default = getattr(cfg, key)
        kinds = {tuple: (list,), bool: (bool,), float: (int, float), int: (int,), str: (str,)}[type(default)]
        if not isinstance(parsed, kinds) or (isinstance(parsed, bool) and not isinstance(default, bool)):
            p.error(f"--set {item}: {key} must be JSON of type {type(default).__name__}, like {json.dumps(default)}")
        cfg = dataclasses.replace(cfg, **{key: type(default)(parsed)})
    if kept is not None:
        changed = [k for k in ARCHITECTURE if getattr(cfg, k) != getattr(kept, k)]
        if changed:
            p.error(f"--init-from {args.init_from}: cannot change {', '.join(changed)} of the model being continued")
        cfg = dataclasses.replace(cfg, init_from=str(args.init_from))
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    cfg = recipe(p, args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ["vae", "latents", "unet", "export"] if args.stage == "all" else [args.stage]
    for stage in stages:
        t0 = time.time()
        if stage == "vae":
            teacher.train_vae(cfg, args.work)
        elif stage == "latents":
            teacher.cache_latents(cfg, args.work, device, args.workers)
        elif stage == "unet":
            teacher.train_unet(cfg, args.work, device, args.fit_minutes)
        else:
            teacher.export(args.work, args.out)
        print(f"stage {stage}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
