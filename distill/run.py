"""BOOT distillation (DESIGN.md §2): a diffusers teacher -> a one-step student, with no data.

    python -m distill.run                                   # shipped shapes teacher, quick preset, CPU
    python -m distill.run --preset full                     # the quality recipe
    python -m distill.run --preset refine --init-from DIR   # then its final-hop refinement (a GPU stage)
    python -m distill.run --teacher DIR --prompts FILE      # any SD-style teacher, one prompt per line
    torchrun --nproc_per_node=N -m distill.run ...          # DDP (gloo on CPU, nccl on GPU)

Per step (all random draws from a generator seeded by (seed, step), so a resumed run sees the
batches an uninterrupted one would, and every rank draws the same global batch and keeps its slice):
  1. draw prompts c, noise ε, t ~ U{1..T}, w ~ U[guidance_min, guidance_max] (with --final-hop F,
     --final-fraction of the t from (F − Δ, F], hopping straight to 0, the rest from (F, T]);
  2. L = L_BS + β·L_BC from boot.method.BootLoss (target network: --target online | ema);
     with --refine N (a second stage from --init-from STUDENT), L_BS of final hops only, against N
     targets of the frozen starting student computed once (boot.method.FinalHopRegression);
  3. AdamW step with gradient clipping, then the EMA update.

Outputs: `--work` holds checkpoints (atomic, resumable with --resume), loss.jsonl, loss.png and
sample grids (student one step beside the teacher's 50-step DDIM); `--out` receives the student
folder of docs/interfaces.md (unet/, vae/, scheduler/, [text_encoder/, tokenizer/], boot.json).
With the shapes grammar as prompts, the student is judged on held-out captions at the end.
--val-every N (the full preset: 250) validates it every N steps on prompts and noise of its own: the
PSNR of its images against the teacher's 50-step DDIM images from the same noise, and with grammar
prompts the judge's accuracy; --keep best (the default when validating) exports the best step by
--select (psnr, the default, for any teacher; judge for the shapes world), not the last.

Resuming with a larger --steps continues the same run: the learning rate is constant after warmup,
so 600 steps + 400 resumed steps equal 1000 uninterrupted ones.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from boot import method as boot
from boot.folders import (
    STUDENT_META,
    check_folder,
    check_model_folder,
    describe_error,
    load_text_stack,
    read_meta,
)
from distill import checkpoint, diffusers_folder, memory, precision

DEFAULT_TEACHER = Path("pretrained/shapes-teacher")
GRAMMAR = "shapes-grammar"
N_SAMPLES = 8  # fixed prompts in the sample grid
SAMPLE_SEED0 = 1_000_000  # seeds of the sample grid and evaluation: SAMPLE_SEED0 + i
VAL_SEED0 = 2_000_000  # noise seeds of the periodic validation: VAL_SEED0 + i
REFERENCE_STEPS = 50  # the teacher's DDIM steps the student is compared against


@dataclass
class RunConfig:
    """Every choice that shapes the student; stored in each checkpoint and in boot.json."""

    teacher: str = str(DEFAULT_TEACHER)
    prompts: str = GRAMMAR  # a prompts file, or GRAMMAR (distill.shapes.sample_captions)
    num_prompts: int = 4096  # captions drawn from the grammar
    preset: str = "quick"
    steps: int = 600
    batch_size: int = 24  # global batch, split across ranks
    lr: float = 2e-5
    warmup: int = 50  # linear LR warmup steps, constant afterwards
    grad_clip: float = 1.0
    delta: int = 20  # Δ: s = max(t - Δ, 0)
    beta: float = 1.0  # β: weight of the boundary loss
    solver_steps: int = 1  # K: teacher DDIM steps inside one bootstrap target (t -> s)
    final_hop: int = 0  # F: t <= F hops straight to 0 through ceil(F·K/Δ) teacher steps (0: off)
    final_fraction: float = 0.25  # with F > 0: share of each batch drawn as final hops, t in (F - Δ, F]
    refine: int = 0  # N > 0: only final hops, on N targets of the frozen --init-from student, computed once
    refine_space: str = "latent"  # --refine's squared error between latents, or between VAE-decoded images
    parameterization: str = boot.DEFAULT_PARAMETERIZATION  # how the student reads its UNet (boot.PARAMETERIZATIONS)
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    guidance_scale: float | None = None  # recommended w; None: the teacher's
    ema: float = 0.99  # EMA decay; 0 disables EMA (the student is the online network)
    target: str = "online"  # network giving the stop-gradient bootstrap target ŷ_t
    seed: int = 0
    init_from: str | None = None  # a student folder whose UNet starts the student (and EMA) instead of the teacher's
    mixed_precision: str = "no"
    teacher_dtype: str = "auto"  # the frozen teacher UNet's dtype (distill.precision.teacher_dtype)
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # R > 0: LoRA adapters of rank R + the condition projection train, the rest is frozen
    text_states: str = "fp32"  # text states cached in fp32, fp16, or encoded per batch ("on-the-fly")
    ema_device: str = "same"  # where the EMA copy lives: the training device, or "cpu"
    refine_chunk: int = 0  # --refine targets per chunk (0: from the memory budget on a GPU, 64 on the CPU)
    memory_budget: float = 0.0  # GB a refine-target chunk may use on a GPU (0: 80% of the free memory)
    compile: bool = False  # torch.compile the student and teacher forwards of the training loop
    checkpoint_every: int = 100
    sample_every: int = 100
    eval_n: int = 64  # held-out grammar captions judged at the end (0: none)
    max_minutes: float = 0.0  # wall-clock cap on the training loop, 0 = none (then `steps_done` < steps)
    val_every: int = 0  # steps between judge validations of the exported student (grammar prompts), 0 = none
    val_n: int = 128  # validation captions (eval split, their own caption and noise seeds)
    keep: str = "last"  # exported weights: "last", or "best" (by the --select rule)
    select: str = "psnr"  # validation rule for --keep best (distill.selection.RULES): teacher agreement or the judge


# Flags left out of the resume check: they do not change the weights of step k.
BOOKKEEPING = ("steps", "preset", "checkpoint_every", "sample_every", "eval_n", "gradient_checkpointing", "compile",
               "max_minutes", "val_every", "val_n", "keep", "ema_device", "refine_chunk", "memory_budget", "select")

PRESETS: dict[str, dict] = {
    # 2 CPU cores, shipped 7M-parameter teacher. A step costs about 7 teacher forwards at batch 32
    # for batch 24 (target g(ε,t), 2 CFG teacher calls, online g at (s, T) forward + backward),
    # i.e. 1.1-2.2 s depending on how fast that forward is (DESIGN.md §2 scoping run vs 0.3 s).
    # Batch 16 x 600 steps is 7-15 min; the 15-minute cap keeps the whole command, with the
    # 50-step teacher reference and the 64-caption evaluation, inside 20 minutes on a slow day.
    "quick": dict(steps=600, batch_size=16, lr=2e-5, warmup=50, ema=0.99, num_prompts=4096,
                  checkpoint_every=100, sample_every=100, eval_n=64, max_minutes=15.0, val_every=0),
    # The quality recipe (hours on CPU, minutes on a GPU).
    # lr 1e-4 at batch 128: 80.3% where lr 2e-5 gave 72.7% after the same 6.2 GPU minutes
    # (docs/ablations.md, "Learning rate and solver steps"); the validation picks the exported step.
    "full": dict(steps=6000, batch_size=128, lr=1e-4, warmup=100, ema=0.999, num_prompts=16384,
                 checkpoint_every=250, sample_every=500, eval_n=300, max_minutes=0.0, val_every=250),
    # A second stage for a GPU: the final-hop refinement of a distilled student (--init-from) at the scale
    # that made the shipped student (docs/ablations.md, "Refinement at GPU scale": 84.8 -> 88.2% validation,
    # best at step 2,800). On 2 CPU cores its targets alone take about 2 h.
    "refine": dict(steps=3500, batch_size=256, lr=2e-5, warmup=50, ema=0.995, num_prompts=16384,
                   checkpoint_every=250, sample_every=1000, eval_n=300, max_minutes=0.0, val_every=200,
                   final_hop=100, refine=65536, val_n=600),
}
# Keys only some presets set; elsewhere their RunConfig defaults (and flags) apply.
PRESET_EXTRAS = ("final_hop", "refine", "val_n")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def preset_values(name: str) -> dict:
    """A preset's values, with RunConfig's for the PRESET_EXTRAS it does not set."""
    defaults = RunConfig()
    return {**{key: getattr(defaults, key) for key in PRESET_EXTRAS}, **PRESETS[name]}


def _preset_help(key: str) -> str:
    return "(default: " + ", ".join(f"{name} {preset_values(name)[key]}" for name in PRESETS) + ")"


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", type=Path, default=DEFAULT_TEACHER, help=f"teacher diffusers folder (default {DEFAULT_TEACHER})")
    a("--prompts", type=Path, default=None,
      help="UTF-8 file, one prompt per line (default: --num-prompts captions of the shapes grammar)")
    a("--out", type=Path, default=None, help="student folder (default students/<teacher name>-boot)")
    a("--work", type=Path, default=None, help="checkpoints, logs and sample grids (default runs/boot/<name>)")
    a("--preset", choices=list(PRESETS), default="quick",
      help="quick: <= 20 min on 2 CPU cores for the shipped teacher; full: the quality recipe; refine: the "
           "final-hop refinement of a distilled student at GPU scale, a second stage after full (needs "
           "--init-from) (default quick)")
    a("--steps", type=int, help=f"optimizer steps {_preset_help('steps')}")
    a("--batch-size", type=int, help=f"global batch, split across processes {_preset_help('batch_size')}")
    a("--lr", type=float, help=f"AdamW learning rate {_preset_help('lr')}")
    a("--warmup", type=int, help=f"linear warmup steps, constant LR afterwards {_preset_help('warmup')}")
    a("--grad-clip", type=float, default=d.grad_clip, help=f"gradient norm clip, 0 = off (default {d.grad_clip})")
    a("--delta", type=int, default=d.delta, help=f"Δ in teacher steps, s = max(t - Δ, 0) (default {d.delta})")
    a("--beta", type=float, default=d.beta, help=f"β, weight of the boundary loss L_BC (default {d.beta})")
    a("--solver-steps", type=int, default=d.solver_steps,
      help=f"K, teacher DDIM steps that make one bootstrap target from t to s; K > 1 lets a larger Δ keep "
           f"the teacher's step size (default {d.solver_steps}, the paper's single step)")
    a("--final-hop", type=int, default=None,
      help="F: every t <= F hops straight to s = 0, its target the teacher's DDIM finishing from the "
           "student's y_t in ceil(F·K/Δ) steps, so the image is trained against the teacher's own last steps "
           "rather than F/Δ chained bootstrap hops; t is then drawn from (F - Δ, T] with --final-fraction of "
           f"each batch in (F - Δ, F]; 0 = off {_preset_help('final_hop')}")
    a("--final-fraction", type=float, default=d.final_fraction,
      help=f"with --final-hop: share of each batch drawn as final hops (default {d.final_fraction})")
    a("--refine", type=int, default=None, metavar="N",
      help="final-hop refinement of a distilled student (needs --init-from and --final-hop): the target network "
           "is frozen at that student, so N final-hop targets (ε, c, w, t in (F - Δ, F] -> the teacher's DDIM "
           "from its ŷ_t to 0) are computed once into --work, and the loop trains only g(ε, 0) on them with "
           f"FinalHopRegression, calling no teacher (docs/ablations.md); 0 = off {_preset_help('refine')}")
    a("--refine-space", choices=("latent", "image"), default=d.refine_space,
      help="with --refine: take the squared error between latents, or between the images the teacher's "
           f"frozen VAE decodes from them (default {d.refine_space})")
    a("--parameterization", choices=boot.PARAMETERIZATIONS, default=d.parameterization,
      help="how the student reads its UNet, for ablations (docs/ablations.md): teacher-at-T = UNet(ε, T) read as "
           "the teacher reads it at T, so the student starts as the teacher's x0-prediction from noise; direct = "
           "the same output taken as the signal; unet-at-t = the UNet's timestep input set to the target time t; "
           "preconditioned = read as teacher-at-T, its optimizer steps scaled by α_T/σ_T where the teacher predicts "
           "epsilon, so a step moves it as far as a v-prediction student's (docs/byo-teacher.md) "
           f"(default {d.parameterization})")
    a("--guidance-min", type=float, default=d.guidance_min, help=f"lowest w trained (default {d.guidance_min})")
    a("--guidance-max", type=float, default=d.guidance_max, help=f"highest w trained (default {d.guidance_max})")
    a("--guidance-scale", type=float, default=None,
      help="recommended guidance stored in boot.json, used for samples and evaluation (default: the teacher's)")
    a("--ema", type=float, help=f"EMA decay of the exported weights, 0 = no EMA {_preset_help('ema')}")
    a("--target", choices=["online", "ema"], default=d.target,
      help=f"network giving the stop-gradient bootstrap target ŷ_t (default {d.target})")
    a("--num-prompts", type=int, help=f"grammar captions when --prompts is not given {_preset_help('num_prompts')}")
    a("--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --work (default: start fresh)")
    a("--init-from", type=Path, default=None,
      help="start from this student folder's weights instead of the teacher's (a new run: fresh optimizer, "
           "step 0; e.g. to go on distilling a student trained elsewhere) (default: none)")
    a("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
      help="autocast dtype; fp16 needs a GPU (default no)")
    a("--teacher-dtype", choices=precision.TEACHER_DTYPES, default=d.teacher_dtype,
      help="dtype the frozen teacher UNet is held and run in, whatever its folder stores; its outputs are read in "
           "fp32; auto = the --mixed-precision dtype, fp32 without (default auto)")
    a("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward (default off)")
    a("--lora-rank", type=int, default=d.lora_rank, metavar="R",
      help="R > 0: a LoRA student, rank-R adapters (peft) plus the condition projection trained on a frozen copy "
           "of the teacher UNet, merged into a plain UNet when saved; 0 = all UNet weights train (default 0)")
    a("--text-states", choices=memory.TEXT_STATES, default=d.text_states,
      help="text states of the prompts: cached in fp32, in fp16 (half the memory), or encoded per batch "
           f"(on-the-fly, for prompt files too large to cache) (default {d.text_states})")
    a("--ema-device", choices=("same", "cpu"), default=d.ema_device,
      help="where the EMA copy of the student lives: the training device, or host memory (cpu) to save "
           f"device memory; needs --target online (default {d.ema_device})")
    a("--refine-chunk", type=int, default=d.refine_chunk,
      help="--refine targets computed per chunk; the targets do not depend on it (0 = on a GPU, as many as "
           f"--memory-budget allows, measured; on the CPU {memory.CPU_REFINE_CHUNK}) (default 0)")
    a("--memory-budget", type=float, default=d.memory_budget,
      help="GB of GPU memory a --refine target chunk may use (0 = 80%% of the free memory) (default 0)")
    a("--compile", action="store_true",
      help="torch.compile the training forwards (student, target, teacher) for long GPU runs; unverified there. "
           "Refused on the CPU: with torch 2.13's CPU compiler the student's gradients came out 47%% away from "
           "eager ones (tests/test_run.py::test_compiled_gradients_match_eager) (default off)")
    a("--device", default="auto", help="auto, cpu, cuda (default auto: cuda if available)")
    a("--checkpoint-every", type=int, help=f"steps between checkpoints {_preset_help('checkpoint_every')}")
    a("--sample-every", type=int,
      help=f"steps between sample grids, 0 = none: no grid, and no teacher reference grid rendered "
           f"{_preset_help('sample_every')}")
    a("--eval-n", type=int, help=f"held-out grammar captions judged at the end, 0 = none {_preset_help('eval_n')}")
    a("--max-minutes", type=float,
      help=f"stop the training loop after this many minutes, 0 = never {_preset_help('max_minutes')}")
    a("--val-every", type=int, default=None,
      help="every this many steps (a checkpoint is written then too) score the exported student on --val-n "
           f"validation prompts: PSNR against the teacher's {REFERENCE_STEPS}-step images (and with grammar prompts "
           "the judge's accuracy) -> val.jsonl, val.png; 0 = never (with --prompts and --select judge: 0) "
           f"{_preset_help('val_every')}")
    a("--val-n", type=int, default=None,
      help=f"validation prompts: the eval split drawn with seed --seed + 1 (with --prompts: prompts of the file) "
           f"and noise seeds from {VAL_SEED0}, so they are not the --eval-n report's {_preset_help('val_n')}")
    a("--keep", choices=("last", "best"), default=None,
      help="weights written to --out: the last step's, or the validation's best by --select (needs --val-every) "
           "(default: best when validating, else last)")
    a("--select", choices=("psnr", "judge"), default=d.select,
      help="validation rule that picks the best step: psnr = mean PSNR of the student's images against the "
           f"teacher's {REFERENCE_STEPS}-step DDIM images from the same noise (any teacher, any prompts; "
           "distill/selection.py); judge = the shapes judge's accuracy (grammar prompts only) "
           f"(default {d.select})")
    return p


def config_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> RunConfig:
    """RunConfig from flags (preset defaults filled in), with ranges checked."""
    preset = preset_values(args.preset)
    if args.prompts is not None and args.select == "judge":  # the judge needs grammar captions
        preset["val_every"] = 0
    pick = lambda name: preset[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    keep = args.keep or ("best" if pick("val_every") else "last")
    cfg = RunConfig(
        teacher=str(args.teacher), prompts=str(args.prompts) if args.prompts else GRAMMAR,
        preset=args.preset, **{k: pick(k) for k in preset}, grad_clip=args.grad_clip, delta=args.delta,
        beta=args.beta, solver_steps=args.solver_steps,
        final_fraction=args.final_fraction, refine_space=args.refine_space,
        parameterization=args.parameterization,
        guidance_min=args.guidance_min, guidance_max=args.guidance_max,
        guidance_scale=args.guidance_scale, target=args.target, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        teacher_dtype=args.teacher_dtype, lora_rank=args.lora_rank, text_states=args.text_states,
        ema_device=args.ema_device, refine_chunk=args.refine_chunk, memory_budget=args.memory_budget,
        compile=args.compile, init_from=str(args.init_from) if args.init_from else None,
        keep=keep, select=args.select,
    )
    checks = [
        (cfg.steps >= 1, "--steps must be >= 1"), (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"), (cfg.warmup >= 0, "--warmup must be >= 0"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0"), (cfg.delta >= 1, "--delta must be >= 1"),
        (1 <= cfg.solver_steps <= cfg.delta, "--solver-steps must be in [1, --delta]"),
        (cfg.final_hop == 0 or cfg.final_hop >= cfg.delta, "--final-hop must be 0 (off) or >= --delta"),
        (0 < cfg.final_fraction < 1, "--final-fraction must be in (0, 1)"),
        (cfg.refine >= 0, "--refine must be >= 0"),
        (cfg.refine == 0 or (cfg.final_hop > 0 and cfg.init_from is not None),
         "--refine needs --final-hop F and --init-from STUDENT (it refines a distilled student's last hop)"),
        (cfg.refine == 0 or cfg.refine >= cfg.batch_size, "--refine N needs N >= --batch-size"),
        (cfg.beta >= 0, "--beta must be >= 0"), (0 <= cfg.ema < 1, "--ema must be in [0, 1)"),
        (0 <= cfg.guidance_min <= cfg.guidance_max <= 16,
         "need 0 <= --guidance-min <= --guidance-max <= 16 (the student's guidance embedding range)"),
        (cfg.target == "online" or cfg.ema > 0, "--target ema needs --ema > 0"),
        (cfg.lora_rank >= 0, "--lora-rank must be >= 0"),
        (cfg.refine_chunk >= 0, "--refine-chunk must be >= 0"),
        (cfg.memory_budget >= 0, "--memory-budget must be >= 0"),
        (cfg.ema_device == "same" or cfg.target == "online",
         "--ema-device cpu needs --target online (the target network runs on the training device)"),
        (cfg.num_prompts >= 1, "--num-prompts must be >= 1"), (cfg.seed >= 0, "--seed must be >= 0"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
        (cfg.sample_every >= 0, "--sample-every must be >= 0"), (cfg.eval_n >= 0, "--eval-n must be >= 0"),
        (cfg.max_minutes >= 0, "--max-minutes must be >= 0"),
        (cfg.val_every >= 0, "--val-every must be >= 0"), (cfg.val_n >= 1, "--val-n must be >= 1"),
        (cfg.keep == "last" or cfg.val_every > 0, "--keep best needs --val-every > 0"),
        (cfg.val_every == 0 or cfg.prompts == GRAMMAR or cfg.select != "judge",
         "--select judge judges grammar captions; it needs the shapes grammar prompts (no --prompts)"),
        (cfg.init_from is None or (Path(cfg.init_from) / "unet").is_dir(),
         f"--init-from {cfg.init_from}: no unet/ folder there (a student folder is expected)"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return cfg


def default_name(teacher: Path) -> str:
    name = teacher.resolve().name
    return (name[: -len("-teacher")] if name.endswith("-teacher") else name) + "-boot"


# --------------------------------------------------------------------------------------------
# Prompts and teacher
# --------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (UTF-8); blank lines are skipped. ValueError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{i}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one prompt per line expected)")
    return prompts


def load_prompts(cfg: RunConfig) -> tuple[list[str], dict]:
    """Training prompts and the provenance record stored in boot.json."""
    if cfg.prompts == GRAMMAR:
        from distill import shapes

        prompts = shapes.sample_captions(cfg.num_prompts, cfg.seed, "train")
        return prompts, {"source": GRAMMAR, "split": "train", "seed": cfg.seed, "count": len(prompts),
                         "distinct": len(set(prompts))}
    prompts = read_prompts(cfg.prompts)
    digest = hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
    return prompts, {"source": cfg.prompts, "sha256": digest, "count": len(prompts),
                     "distinct": len(set(prompts))}


@dataclass
class Teacher:
    """The parts of a teacher folder distillation needs (everything frozen)."""

    folder: Path
    text: object  # boot.folders.TextStack
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    meta: dict

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        h, w = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else c.sample_size
        return (c.in_channels, h, w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        up = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.latent_shape[1] * up, self.latent_shape[2] * up, 3)

    @property
    def time_ids(self) -> torch.Tensor | None:
        """SDXL's constant add_time_ids for the image size distilled (boot.sdxl), else None."""
        from boot import sdxl

        return sdxl.time_ids(self.image_shape[:2]) if sdxl.uses_text_time(self.unet) else None


class TeacherLoadError(ValueError):
    """A teacher folder whose files are missing or unreadable (message names the part)."""


def load_teacher(folder: str | Path, dtype: torch.dtype = torch.float32) -> Teacher:
    """The frozen teacher, its UNet cast to `dtype` and its VAE and text encoder to fp32, whatever dtype
    the folder stores (distill.precision)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_folder(folder)
    part = "scheduler"
    try:
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=dtype)
        unet.eval().requires_grad_(False)
        part = "vae"
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, torch_dtype=torch.float32)
        vae.eval().requires_grad_(False)
        part = "text encoder"
        text_stack = load_text_stack(folder)
        text_stack.text_encoder.float()
    except Exception as err:  # diffusers/safetensors raise OSError, ValueError, SafetensorError, ...
        raise TeacherLoadError(f"cannot load the teacher from {folder}: its {part} is missing or corrupt "
                               f"({describe_error(err)})") from err
    check_added_conditioning(folder, unet, text_stack)
    return Teacher(folder, text_stack, unet, vae, sched_cfg, read_meta(folder))


def check_added_conditioning(folder: Path, unet: torch.nn.Module, text_stack) -> None:
    """TeacherLoadError unless the UNet's added conditioning and the text stack fit (SDXL family)."""
    from boot import sdxl

    if text_stack.pooled:
        try:
            sdxl.check_unet(unet, text_stack.text_encoder.hidden_size, text_stack.text_encoder.pooled_size)
        except ValueError as err:
            raise TeacherLoadError(f"cannot distil {folder}: {err}") from None
    elif getattr(unet.config, "addition_embed_type", None) is not None:
        raise TeacherLoadError(f"cannot distil {folder}: its UNet takes {unet.config.addition_embed_type!r} added "
                               "conditioning, which needs the SDXL layout (text_encoder_2/ and tokenizer_2/)")


def warn_long_prompts(text, prompts: list[str], source: str | None) -> None:
    """Prompts over the text encoder's token limit are truncated by it (as diffusers does); say which."""
    limit = getattr(text.tokenizer, "model_max_length", None)
    if not limit or limit > 10**6:
        return
    lengths = text.tokenizer(prompts, truncation=False)["input_ids"]
    long = [i for i, ids in enumerate(lengths) if len(ids) > limit]
    if not long:
        return
    where = ""
    if source:
        lines = [i for i, raw in enumerate(Path(source).read_bytes().splitlines(), start=1) if raw.strip()]
        shown = ", ".join(str(lines[i]) for i in long[:10]) + (", ..." if len(long) > 10 else "")
        where = f" ({Path(source).name} line{'s' if len(long) > 1 else ''} {shown})"
    print(f"warning: {len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} tokens"
          f"{where}; they are truncated to {limit} tokens for distillation, and the served model rejects them",
          file=sys.stderr)


def build_student(teacher: Teacher, schedule: boot.NoiseSchedule, init_from: str | None = None,
                  parameterization: str = boot.DEFAULT_PARAMETERIZATION, lora_rank: int = 0) -> boot.Student:
    """g_θ: the teacher's UNet (its own fp32 copy, from disk) + the zero-initialised condition projection,
    or the UNet of the student folder `init_from` (same architecture as the teacher's and the same
    output parameterization); with `lora_rank` R > 0, frozen, with rank-R adapters (distill.lora). New students
    get boot.DEFAULT_CONDITIONING; `init_from` keeps its own."""
    from diffusers import UNet2DConditionModel

    conditioning = boot.DEFAULT_CONDITIONING
    if init_from:
        meta_path = Path(init_from) / STUDENT_META
        theirs = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if boot.recorded_parameterization(theirs) != parameterization:
            raise ValueError(f"--init-from {init_from} reads its UNet as {boot.recorded_parameterization(theirs)!r}, "
                             f"not --parameterization {parameterization!r}")
        conditioning = boot.recorded_conditioning(theirs)

    unet = boot.add_condition_projection(UNet2DConditionModel.from_pretrained(
        teacher.folder / "unet", use_safetensors=True, torch_dtype=torch.float32), conditioning)
    if init_from:
        try:
            trained = boot.load_student_unet(Path(init_from) / "unet", conditioning)
            unet.load_state_dict(trained.state_dict())
        except Exception as err:
            raise TeacherLoadError(f"cannot load the student to start from, {init_from}: "
                                   f"{describe_error(err)}") from err
    unet = unet.float()
    if lora_rank:
        from distill import lora

        unet = lora.add_lora(unet, lora_rank)
    return boot.Student(unet.train(), schedule, teacher.prediction_type, parameterization, teacher.time_ids)


@torch.no_grad()
def encode_prompts(text, prompts: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states once per distinct prompt: (states (N_distinct, L, D), row of each prompt (N,))."""
    cache = memory.PromptStates(text, prompts, "fp32", chunk=chunk)
    return cache.table, cache.rows


# --------------------------------------------------------------------------------------------
# Batches, schedules, EMA
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    prompt: torch.Tensor  # (B,) index into the prompt list
    noise: torch.Tensor  # (B, C, h, w) ε, the trajectory's starting noise
    t: torch.Tensor  # (B,) long, uniform in [1, T] (with --final-hop: see draw_batch)
    w: torch.Tensor  # (B,) guidance scale

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's contiguous slice of the global batch."""
        n = self.t.shape[0] // world
        return Batch(*(x[rank * n:(rank + 1) * n] for x in dataclasses.astuple(self)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): resume- and world-size-invariant draws."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_batch(cfg: RunConfig, step: int, n_prompts: int, latent_shape: tuple[int, ...], T: int) -> Batch:
    """The global batch of `step` (identical on every rank)."""
    gen = step_generator(cfg.seed, step)
    b = cfg.batch_size
    prompt = torch.randint(0, n_prompts, (b,), generator=gen)
    noise = torch.randn((b, *latent_shape), generator=gen)
    t = torch.randint(1, T + 1, (b,), generator=gen)
    w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=gen)
    if cfg.final_hop:  # final hops from (F - Δ, F] (their y_t trained by the hops from (F, F + Δ]), the rest (F, T]
        final = torch.rand(b, generator=gen) < cfg.final_fraction
        t_final = torch.randint(cfg.final_hop - cfg.delta + 1, cfg.final_hop + 1, (b,), generator=gen)
        t = torch.where(final, t_final, torch.randint(cfg.final_hop + 1, T + 1, (b,), generator=gen))
    return Batch(prompt, noise, t, w)


def lr_at(cfg: RunConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, online: torch.nn.Module, decay: float, step: int) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d warmed up as min(decay, (1 + step) / (10 + step)); over the
    trained parameters only (frozen ones, a LoRA student's base, are equal in both), wherever the EMA lives."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), online.parameters()):
        if p.requires_grad:
            pe.lerp_(p.detach().to(pe.device), 1 - d)


# --------------------------------------------------------------------------------------------
# Final-hop refinement (--refine N)
# --------------------------------------------------------------------------------------------
REFINE_KEY = ("teacher", "prompts", "num_prompts", "init_from", "refine", "final_hop", "delta", "solver_steps",
              "guidance_min", "guidance_max", "seed", "teacher_dtype", "mixed_precision", "text_states")


def refine_key(cfg: RunConfig) -> str:
    """What the stored final-hop targets depend on: the recipe's fields, and the contents (not only the
    paths) of the prompts, the teacher's UNet and the starting student's UNet."""
    from distill.selection import file_sha256, unet_sha256

    if cfg.prompts == GRAMMAR:
        prompts = hashlib.sha256("\n".join(load_prompts(cfg)[0]).encode()).hexdigest()
    else:
        prompts = file_sha256(cfg.prompts)
    return json.dumps({**{k: getattr(cfg, k) for k in REFINE_KEY}, "prompts_sha256": prompts,
                       "teacher_unet_sha256": unet_sha256(cfg.teacher), "init_unet_sha256": unet_sha256(cfg.init_from)},
                      sort_keys=True)


@dataclass
class FinalHopTargets:
    """N final hops (prompt row, ε, t in (F − Δ, F], w) and their fixed targets y: the teacher's DDIM
    from the frozen starting student's ŷ_t to 0, ceil(F·K/Δ) steps (boot.method.bootstrap_target)."""

    prompt: torch.Tensor  # (N,) index into the prompt list
    noise: torch.Tensor  # (N, C, h, w)
    t: torch.Tensor  # (N,) long
    w: torch.Tensor  # (N,)
    y: torch.Tensor  # (N, C, h, w)

    def rows(self, cfg: RunConfig, step: int, dist: Dist) -> torch.Tensor:
        """This rank's slice of `step`'s global batch of target rows (same on every rank, resume-invariant)."""
        idx = torch.randint(0, len(self.t), (cfg.batch_size,), generator=step_generator(cfg.seed, step))
        n = cfg.batch_size // dist.world
        return idx[dist.rank * n:(dist.rank + 1) * n]


def final_hop_targets(cfg: RunConfig, teacher: Teacher, teacher_x0: boot.TeacherX0, loss_fn: boot.BootLoss,
                      states: memory.PromptStates, uncond: torch.Tensor, dist: Dist, work: Path,
                      uncond_pooled: torch.Tensor | None = None) -> FinalHopTargets:
    """Compute (each rank a share of the chunks) or reload work/final_hop_targets.safetensors."""
    from safetensors.torch import load_file, save_file

    path, dev = work / "final_hop_targets.safetensors", dist.device
    key = refine_key(cfg)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return FinalHopTargets(**load_file(path))
    # 1. N final hops drawn as draw_batch draws them, from a random stream of their own (not any step's).
    n, F = cfg.refine, cfg.final_hop
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed], spawn_key=(1,)).generate_state(
        1, np.uint64)[0]))
    prompt = torch.randint(0, len(states.rows), (n,), generator=gen)
    noise = torch.randn((n, *teacher.latent_shape), generator=gen)
    t = torch.randint(F - cfg.delta + 1, F + 1, (n,), generator=gen)
    w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(n, generator=gen)
    # 2. Targets from the frozen starting student (the target network, never updated).
    frozen = build_student(teacher, teacher_x0.schedule, cfg.init_from, cfg.parameterization)
    frozen = frozen.to(dev).eval().requires_grad_(False)
    steps = torch.tensor(loss_fn.final_steps)  # the final hop's teacher steps, as BootLoss takes them
    y = torch.zeros_like(noise, device=dev)

    def targets(j: slice) -> torch.Tensor:  # 1 + 2·ceil(F·K/Δ) UNet calls at batch j's size
        b = j.stop - j.start
        with precision.autocast(dev, cfg.mixed_precision):
            pooled_c, pooled_u = pooled_pair(states.pooled(prompt[j]), uncond_pooled, b)
            return boot.bootstrap_target(frozen, teacher_x0, noise[j].to(dev), states(prompt[j]),
                                         uncond.expand(b, -1, -1), w[j].to(dev), t[j].to(dev),
                                         torch.zeros(b, dtype=torch.long, device=dev), steps.expand(b).to(dev),
                                         pooled_c, pooled_u)

    chunk = memory.refine_chunk(cfg.refine_chunk, cfg.memory_budget, dev, lambda b: targets(slice(0, b)))
    mine = range(dist.rank * chunk, n, dist.world * chunk)
    for i in tqdm(mine, desc=f"final-hop targets ({chunk} per chunk)", disable=not dist.main):
        j = slice(i, min(i + chunk, n))
        y[j] = targets(j)
    if dist.world > 1:  # each row was filled by one rank, zeros elsewhere: the sum is exact
        torch.distributed.all_reduce(y)
    targets = FinalHopTargets(prompt, noise, t, w, y.cpu())
    if dist.main:
        tmp = path.with_suffix(".tmp")
        save_file(dataclasses.asdict(targets), tmp, metadata={"key": key})
        os.replace(tmp, path)
    return targets


def pooled_pair(pooled: torch.Tensor | None, uncond_pooled: torch.Tensor | None,
                n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the prompts' pooled embeddings, the unconditional one expanded to n rows), or (None, None) for
    teachers without pooled embeddings."""
    if pooled is None:
        return None, None
    return pooled, uncond_pooled.expand(n, -1)


def image_decoder(teacher: Teacher):
    """The teacher's frozen VAE decoder as a latent -> image map that gradients pass through."""
    vae = teacher.vae
    return lambda z: vae.decode(z / vae.config.scaling_factor).sample


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # TF32 matmuls and convolutions, as distill.teacher trains; the GPU refinements that made the
        # shipped student ran with them (docs/ablations.md, session 10).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        # Long timeout: rank 0 renders the teacher reference while the others wait.
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, dev)


def all_mean(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        torch.distributed.all_reduce(values)
        values = values / dist.world
    return values


# --------------------------------------------------------------------------------------------
# Logs, samples, evaluation
# --------------------------------------------------------------------------------------------
def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, start: int) -> None:
    """Drop records of steps a resumed run will redo (written after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start]
        path.write_text("".join(line + "\n" for line in keep))


def make_pipeline(teacher: Teacher, student: boot.Student, cfg: RunConfig, w: float):
    from boot.pipeline import BootPipeline

    meta = {"latent_shape": list(teacher.latent_shape), "guidance_range": [cfg.guidance_min, cfg.guidance_max],
            "guidance_scale": w}
    return BootPipeline(teacher.text, boot.OneStepGenerator(student), teacher.vae, teacher.scheduler_config, meta)


class Samples:
    """Fixed prompts and seeds; the teacher's 50-step DDIM images are rendered once."""

    def __init__(self, teacher: Teacher, prompts: list[str], w: float, work: Path):
        from boot.samplers import TeacherSampler

        self.prompts, self.w, self.work = prompts, w, work
        self.seeds = [SAMPLE_SEED0 + i for i in range(len(prompts))]
        # The run's own teacher modules: its device and --teacher-dtype precision, no second copy.
        sampler = TeacherSampler(teacher.folder, REFERENCE_STEPS, w, parts=(teacher.text, teacher.unet, teacher.vae))
        self.teacher = sampler(prompts, self.seeds, w)
        self.initial: list | None = None

    def save(self, pipe, step: int) -> float:
        """Write samples/step-XXXXXXXX.png and samples.png; return PSNR vs the teacher (dB)."""
        from distill.evaluate import comparison_grid, psnr

        images = pipe(self.prompts, self.seeds, self.w)
        if self.initial is None:
            self.initial = images
        columns = {f"teacher-{REFERENCE_STEPS}": self.teacher, "student init": self.initial,
                   f"student step {step}": images}
        grid = comparison_grid(columns, self.prompts, rows=len(self.prompts))
        (self.work / "samples").mkdir(exist_ok=True)
        grid.save(self.work / "samples" / f"step-{step:08d}.png")
        grid.save(self.work / "samples.png")
        value = float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(images, self.teacher)]))
        self._keep(lambda r: r["step"] != step, {"step": step, "psnr_vs_teacher": value})
        return value

    def truncate(self, start: int) -> None:
        """Drop the records of steps a resumed run redoes (a fresh run, start 0: all but step 0's)."""
        self._keep(lambda r: r["step"] <= start)

    def _keep(self, keep, new: dict | None = None) -> None:
        """Rewrite samples.jsonl with the records `keep` accepts (+ `new`), one per step, in step order."""
        path = self.work / "samples.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        records = sorted([r for r in records if keep(r)] + ([new] if new else []), key=lambda r: r["step"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)


class Validation:
    """Periodic validation of the exported student on fixed prompts and noise seeds (val.jsonl,
    val.png), keeping the weights of the best step by the --select rule in `work/best/` for
    --keep best (distill/selection.py). Every record holds the mean PSNR against the teacher's
    REFERENCE_STEPS-step DDIM images from the same noise (computed once, cached in
    work/val_teacher.safetensors), and with grammar prompts the judge's accuracy too. Grammar runs
    validate on eval-split captions of their own draw (seed + 1) with their own noise seeds, so picking
    the best step on them does not bias the final --eval-n report; --prompts runs on --val-n prompts of
    the file."""

    def __init__(self, cfg: RunConfig, w: float, work: Path, start: int, teacher: Path, prompts: list[str]):
        from distill import selection, shapes

        self.captions = (shapes.sample_captions(cfg.val_n, cfg.seed + 1, "eval") if cfg.prompts == GRAMMAR
                         else selection.validation_prompts(prompts, cfg.val_n, cfg.seed + 1))
        self.seeds = [VAL_SEED0 + i for i in range(cfg.val_n)]
        self.judged = cfg.prompts == GRAMMAR
        self.rule, self.key = cfg.select, selection.METRIC[cfg.select]
        self.w, self.work, self.log, self.best_dir = w, work, work / "val.jsonl", work / "best"
        if start == 0:  # a fresh run: forget an earlier run's validations and best weights
            self.log.unlink(missing_ok=True)
            shutil.rmtree(self.best_dir, ignore_errors=True)
        # Validations run right after a checkpoint, so a resumed run keeps those up to its start.
        records = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        self.records = [r for r in records if r["step"] <= start]
        self.log.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.reference = selection.TeacherReference(teacher, REFERENCE_STEPS, work / "val_teacher.safetensors"
                                                    ).images(self.captions, self.seeds, w)

    @property
    def best(self) -> dict | None:
        """The best record by the rule, whose weights are in best/ (the first of equal values)."""
        from distill import selection

        return selection.pick(self.records, self.rule)

    def describe(self, record: dict) -> str:
        text = (f"PSNR vs teacher {record['psnr_vs_teacher']:.2f} dB" if record.get("psnr_vs_teacher") is not None
                else "no PSNR")
        return text + (f", judge accuracy {100 * record['accuracy']:.1f}%" if record.get("accuracy") is not None
                       else "")

    def selection(self) -> dict:
        """boot.json's record of the rule that chose the exported step, and its value there."""
        best = self.best
        return {"rule": self.rule, "metric": self.key, "value": best[self.key], "step": best["step"],
                "prompts": len(self.captions), "teacher_steps": REFERENCE_STEPS, "guidance_scale": self.w}

    def run(self, pipe, step: int, unet: torch.nn.Module) -> dict:
        from distill import selection

        images = pipe(self.captions, self.seeds, self.w)
        record = {"step": step, "psnr_vs_teacher": selection.mean_psnr(images, self.reference),
                  **(selection.judge_scores(self.captions, images) if self.judged else {})}
        previous = self.best
        self.records.append(record)
        _append_jsonl(self.log, record)
        if previous is None or record[self.key] > previous[self.key]:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-best-", dir=self.work))
            boot.save_student_unet(unet, tmp / "unet")
            (tmp / "val.json").write_text(json.dumps(record))
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(tmp, self.best_dir)
        self.plot()
        return record

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in self.records]
        ax.plot(steps, [r["psnr_vs_teacher"] for r in self.records], "m-o", ms=3, label="PSNR vs teacher (dB)")
        ax.set(xlabel="step", ylabel="PSNR vs teacher (dB)")
        if self.judged:
            right = ax.twinx()
            for key, style in (("accuracy", "k-o"), ("single", "b--"), ("two", "r--")):
                vals = [r.get(key) for r in self.records]
                if any(v is not None for v in vals):
                    right.plot(steps, [100 * v if v is not None else np.nan for v in vals], style, ms=3,
                               label=f"judge {key} (%)")
            right.set(ylabel="judge accuracy (%)", ylim=(0, 100))
            right.legend(loc="lower right", fontsize=8)
        best = self.best
        ax.axvline(best["step"], color="g", lw=0.8, label=f"best by {self.rule}: step {best['step']}")
        ax.set_title(f"validation: student-1 on {len(self.captions)} prompts, guidance {self.w}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(self.work / "val.png", dpi=100)
        plt.close(fig)


def evaluate_student(cfg: RunConfig, teacher: Teacher, pipe, w: float, work: Path) -> dict:
    """Judge accuracy of student-1 and teacher-50 on held-out grammar captions (same noise)."""
    from distill import evaluate, shapes

    captions = shapes.sample_captions(cfg.eval_n, cfg.seed, "eval")
    seeds = [SAMPLE_SEED0 + i for i in range(cfg.eval_n)]
    ref = evaluate.TeacherSampler(teacher.folder, REFERENCE_STEPS, w, parts=(teacher.text, teacher.unet, teacher.vae))
    t_res, t_images = evaluate.evaluate(ref, captions, seeds, w)
    s_res, s_images = evaluate.evaluate(pipe, captions, seeds, w, reference=t_images)
    title = f"BOOT student vs teacher, {cfg.eval_n} eval-split captions, guidance {w}"
    evaluate.write_report([s_res, t_res], {s_res.name: s_images, t_res.name: t_images}, captions,
                          work / "eval", title)
    print(evaluate.markdown([s_res, t_res], title))
    return {"captions": cfg.eval_n, "guidance_scale": w, "student_accuracy": s_res.accuracy,
            f"teacher{REFERENCE_STEPS}_accuracy": t_res.accuracy,
            "psnr_vs_teacher": s_res.psnr_vs_reference, "report": str(work / "eval" / "report.md")}


def final_losses(log: Path, last: int = 20) -> dict:
    records = [json.loads(line) for line in log.read_text().splitlines()][-last:] if log.exists() else []
    keys = ("loss", "bootstrap", "boundary")
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


# --------------------------------------------------------------------------------------------
# Student folder
# --------------------------------------------------------------------------------------------
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
                 extra: dict, conditioning: str = boot.DEFAULT_CONDITIONING) -> dict:
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
        "conditioning": boot.conditioning_record(conditioning),
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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def resume_or_reset(cfg: RunConfig, resume: bool, ckpt_dir: Path, modules: dict, opt, scaler, dist: Dist) -> int:
    """Load the newest checkpoint (--resume) or clear old ones; return the first step to run."""
    last = checkpoint.latest(ckpt_dir)
    if not resume:
        if last is not None and dist.main:
            print(f"starting fresh: removing checkpoints in {ckpt_dir} (pass --resume to continue from {last.name})")
            shutil.rmtree(ckpt_dir)
        return 0
    if last is None:
        if dist.main:
            print(f"--resume: no checkpoint in {ckpt_dir}, starting at step 0")
        return 0
    info = checkpoint.load(last, modules, opt)
    stored = info["meta"]["config"]
    defaults = dataclasses.asdict(RunConfig())  # for fields newer than the checkpoint
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in BOOKKEEPING and stored.get(k, defaults[k]) != v]
    if changed:
        raise ValueError(f"--resume: {', '.join(f'{k} {stored.get(k)!r} -> {getattr(cfg, k)!r}' for k in changed)}"
                         f" differ from the checkpoint {last}; use the same flags or a new --work")
    if scaler is not None and info["meta"].get("scaler"):
        scaler.load_state_dict(info["meta"]["scaler"])
    if dist.main:
        print(f"resumed {last} (step {info['step']})")
    return int(info["step"])


def train(cfg: RunConfig, args, teacher: Teacher, prompts: list[str], prompts_info: dict, dist: Dist,
          out: Path, work: Path) -> Path:
    """The distillation procedure, top to bottom (numbered as in the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = dist.device
    w_rec = recommended_guidance(cfg, teacher)
    # 0a. Frozen teacher f_w and cached text states (one per distinct prompt; uncond = "").
    schedule = boot.NoiseSchedule.from_scheduler_config(teacher.scheduler_config).to(dev)
    if cfg.final_hop >= schedule.T:
        raise ValueError(f"--final-hop {cfg.final_hop} must be below the teacher's last timestep {schedule.T}")
    teacher.text.to(dev)
    # SDXL: pooled embeddings cached beside the states; the unconditional context as its pipeline makes it.
    states = memory.PromptStates(teacher.text, prompts, cfg.text_states, dev)
    uncond, uncond_pooled = (None if x is None else x.float().to(dev) for x in teacher.text.unconditional())
    teacher_x0 = boot.TeacherX0(teacher.unet.to(dev), schedule, teacher.prediction_type, teacher.time_ids)
    teacher.vae.to(dev)
    # 0b. Online student g_θ, its EMA (a copy, on --ema-device), the bootstrap-target network, optimizer.
    student = build_student(teacher, schedule, cfg.init_from, cfg.parameterization, cfg.lora_rank).to(dev)
    if dist.main:
        lineage(cfg, work, 0, fresh=not args.resume or checkpoint.latest(work / "checkpoints") is None)
    ema = (copy.deepcopy(student).to(dev if cfg.ema_device == "same" else "cpu").eval().requires_grad_(False)
           if cfg.ema > 0 else None)
    if cfg.gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    target = ema if cfg.target == "ema" else student
    exported = ema if ema is not None else student
    opt = torch.optim.AdamW([p for p in student.unet.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    amp_dtype = precision.autocast_dtype(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    kappa = student.update_scale  # a preconditioned epsilon student's steps are scaled by κ (boot/method.py)
    loss_fn = boot.BootLoss(delta_steps=cfg.delta, beta=cfg.beta, solver_steps=cfg.solver_steps,
                            final_hop=cfg.final_hop)
    refine = (final_hop_targets(cfg, teacher, teacher_x0, loss_fn, states, uncond, dist, work, uncond_pooled)
              if cfg.refine else None)
    refine_loss = boot.FinalHopRegression(image_decoder(teacher) if cfg.refine_space == "image" else None)
    ckpt_dir, log_path = work / "checkpoints", work / "loss.jsonl"

    # 0c. Reference images (rank 0) before any checkpoint is loaded: "student init" is step 0's student.
    #     --sample-every 0 renders none (at SD scale on a CPU the 50-step teacher grid alone takes hours).
    samples = None
    if dist.main and cfg.sample_every:
        samples = Samples(teacher, sample_prompt_list(cfg, prompts), w_rec, work)
        with memory.placed(exported, dev):
            samples.save(make_pipeline(teacher, exported, cfg, w_rec), 0)
    modules = {"unet": student.unet, **({"ema": ema.unet} if ema is not None else {})}
    start = resume_or_reset(cfg, args.resume, ckpt_dir, modules, opt, scaler, dist)
    val = None
    if dist.main:
        _truncate_log(log_path, start)
        if samples is not None:
            samples.truncate(start)
        if cfg.val_every:
            val = Validation(cfg, w_rec, work, start, teacher.folder, prompts)
            if start == 0:
                with memory.placed(exported, dev):
                    val.run(make_pipeline(teacher, exported, cfg, w_rec), 0, exported.unet)
    if dist.world > 1:
        torch.distributed.barrier()
    net = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None,
              broadcast_buffers=False) if dist.world > 1 else student
    if cfg.compile:  # the loop's calls only; samples, checkpoints and the export use the plain modules
        net, teacher_x0 = torch.compile(net), boot.TeacherX0(torch.compile(teacher.unet), schedule,
                                                              teacher.prediction_type, teacher.time_ids)
        target = torch.compile(target)

    t0, done = time.time(), start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="boot", disable=not dist.main)
    for step in bar:
        # 1. This rank's slice of the global batch of `step` (--refine: of the stored final hops).
        r = refine.rows(cfg, step, dist) if refine is not None else None
        b = (Batch(refine.prompt[r], refine.noise[r], refine.t[r], refine.w[r]) if refine is not None else
             draw_batch(cfg, step, len(prompts), teacher.latent_shape, schedule.T).shard(dist.rank, dist.world))
        cond = states(b.prompt)
        pooled_c, pooled_u = pooled_pair(states.pooled(b.prompt), uncond_pooled, len(b.prompt))
        noise, t, w = b.noise.to(dev), b.t.to(dev), b.w.to(dev)
        # 2. L = L_BS + β·L_BC; gradients only through the online student's s and T branches
        #    (--refine: L_BS of the final hop against its stored target, the s = 0 branch only).
        with precision.autocast(dev, cfg.mixed_precision):
            terms = (refine_loss(net, schedule, noise, cond, w, t, refine.y[r].to(dev), pooled_c)
                     if refine is not None else
                     loss_fn(net, target, teacher_x0, noise, cond, uncond.expand(len(t), -1, -1), w, t,
                             pooled_c, pooled_u))
        loss = terms["loss"].mean()
        # 3. AdamW with clipping, then EMA.
        optimizer_step(loss, opt, scaler, student.unet, kappa * lr_at(cfg, step), cfg.grad_clip)
        if ema is not None:
            update_ema(ema.unet, student.unet, cfg.ema, step)
        # 4. Logs (averaged over ranks), samples, checkpoints; rank 0's clock decides an early stop.
        done = step + 1
        out_of_time = dist.main and cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
        flag = torch.tensor(float(out_of_time) * dist.world, device=dev)
        *logged, stop = all_mean(torch.stack([loss.detach(), terms["bootstrap"].mean(), terms["boundary"].mean(),
                                              flag]).float(), dist).tolist()
        last = done == cfg.steps or stop > 0
        if dist.main:
            record = dict(zip(("loss", "bootstrap", "boundary"), logged))
            bar.set_postfix(loss=f"{record['loss']:.4f}", bs=f"{record['bootstrap']:.4f}",
                            bc=f"{record['boundary']:.4f}")
            _append_jsonl(log_path, {"step": step, **record, "lr": lr_at(cfg, step), "time": time.time() - t0})
            if cfg.sample_every and done % cfg.sample_every == 0 and not last:
                with memory.placed(exported, dev):
                    value = samples.save(make_pipeline(teacher, exported, cfg, w_rec), done)
                tqdm.write(f"step {done}: sample PSNR vs teacher-{REFERENCE_STEPS} {value:.2f} dB")
                plot_loss(log_path, work)
            validate = val is not None and (done % cfg.val_every == 0 or last)
            if done % cfg.checkpoint_every == 0 or last or validate:
                meta = {"config": dataclasses.asdict(cfg), "scaler": scaler.state_dict() if scaler else None}
                checkpoint.save(ckpt_dir, done, modules, opt, meta)
            if validate:  # after the checkpoint: a resumed run never sees a validation of steps it redoes
                with memory.placed(exported, dev):
                    record = val.run(make_pipeline(teacher, exported, cfg, w_rec), done, exported.unet)
                tqdm.write(f"step {done}: validation {val.describe(record)} (best by {cfg.select}: "
                           f"{val.describe(val.best)} at step {val.best['step']})")
        if stop > 0:
            if dist.main:
                tqdm.write(f"--max-minutes {cfg.max_minutes} reached after step {done} of {cfg.steps}; "
                           "continue with --resume")
            break
    bar.close()
    if dist.main:
        finish(cfg, teacher, exported, prompts_info, samples, done, w_rec, dist, out, work, time.time() - t0, val)
    return out


def optimizer_step(loss: torch.Tensor, opt, scaler, unet: torch.nn.Module, lr: float, clip: float) -> None:
    """Backward (loss-scaled under fp16), unscale, clip the global grad norm, AdamW step at `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def finish(cfg: RunConfig, teacher: Teacher, exported: boot.Student, prompts_info: dict, samples: Samples | None,
           done: int, w_rec: float, dist: Dist, out: Path, work: Path, wall: float,
           val: Validation | None = None) -> None:
    """Rank 0 after training: last sample grid, student folder, losses and evaluation summary."""
    log_path = work / "loss.jsonl"
    plot_loss(log_path, work)
    steps, extra = done, {}
    if val is not None:
        extra["validation"] = {"captions": cfg.val_n, "every": cfg.val_every, "best": val.best,
                               "last": val.records[-1] if val.records else None}
        if cfg.keep == "best":
            exported.unet.load_state_dict(load_unet_weights(work / "best" / "unet"))
            steps = val.best["step"]
            extra["steps_run"] = done
            extra["selection"] = val.selection()
            print(f"--keep best: exporting step {steps} (validation {val.describe(val.best)}, "
                  f"last step {done}: {val.describe(val.records[-1])})")
    exported.to(dist.device)  # an EMA kept on the CPU renders on the training device from here on
    pipe = make_pipeline(teacher, exported, cfg, w_rec)
    psnr = samples.save(pipe, steps) if samples is not None else None
    losses = final_losses(log_path)
    meta = student_meta(cfg, teacher, prompts_info, steps, w_rec, {
        "world_size": dist.world, "device": str(dist.device), "wall_time_s_this_run": round(wall, 1),
        "final_losses": losses, "sample_psnr_vs_teacher": psnr, **extra, **lineage(cfg, work, steps)},
        exported.conditioning)
    unet = exported.unet
    if cfg.lora_rank:  # W + (α/r)·B·A into a plain UNet: the folder is an ordinary student's
        from distill import lora

        meta["lora"] = {"rank": cfg.lora_rank, "target_modules": list(lora.TARGET_MODULES), "merged": True}
        unet = lora.merged(unet)
    write_student(out, teacher, unet, meta, work)
    if done < cfg.steps:
        print(f"warning: stopped at step {done} of {cfg.steps} (--max-minutes {cfg.max_minutes})")
    print("final losses (mean of last 20 steps): " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
    if samples is not None:
        print(f"sample grid PSNR vs teacher-{REFERENCE_STEPS} ({len(samples.prompts)} images): {psnr:.2f} dB "
              f"-> {work / 'samples.png'}")
    if cfg.prompts == GRAMMAR and cfg.eval_n:
        summary = evaluate_student(cfg, teacher, pipe, w_rec, work)
        update_student_meta(out, evaluation=summary)
        print(f"student-1 accuracy {100 * summary['student_accuracy']:.1f}% vs teacher-{REFERENCE_STEPS} "
              f"{100 * summary[f'teacher{REFERENCE_STEPS}_accuracy']:.1f}%, PSNR vs teacher "
              f"{summary['psnr_vs_teacher']:.2f} dB ({cfg.eval_n} held-out captions)")
    print(f"student written to {out}")


def plot_loss(log_path: Path, work: Path) -> None:
    from distill.teacher import plot_losses

    plot_losses(log_path, work / "loss.png", ["loss", "bootstrap", "boundary"], "BOOT loss (L = L_BS + β L_BC)")


def sample_prompt_list(cfg: RunConfig, prompts: list[str]) -> list[str]:
    if cfg.prompts == GRAMMAR:
        from distill import shapes

        return shapes.sample_captions(N_SAMPLES, cfg.seed, "eval")
    return list(dict.fromkeys(prompts))[:N_SAMPLES]


def recommended_guidance(cfg: RunConfig, teacher: Teacher) -> float:
    """--guidance-scale, else the teacher's recommendation, clamped into the trained range."""
    if cfg.guidance_scale is not None:
        return float(cfg.guidance_scale)
    w = float(teacher.meta.get("guidance_scale", 7.5))
    return min(max(w, cfg.guidance_min), cfg.guidance_max)


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> Path:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = config_from_args(args, p)
    if cfg.guidance_scale is not None and not cfg.guidance_min <= cfg.guidance_scale <= cfg.guidance_max:
        p.error(f"--guidance-scale {cfg.guidance_scale} is outside [--guidance-min, --guidance-max]")
    # Inputs are checked before anything slow is loaded.
    try:
        prompts, prompts_info = load_prompts(cfg)
    except (OSError, ValueError) as err:
        p.error(str(err))
    try:  # a teacher folder BOOT cannot distil: one line, from its config files alone
        check_model_folder(args.teacher)
    except (OSError, ValueError) as err:
        print(f"error: teacher: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    dist = setup_distributed(args.device)
    if cfg.batch_size % dist.world:
        p.error(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world} processes")
    if cfg.mixed_precision == "fp16" and dist.device.type != "cuda":
        p.error("--mixed-precision fp16 needs a CUDA device (use bf16 or no on CPU)")
    if cfg.compile and dist.device.type == "cpu":
        p.error("--compile is refused on the CPU: torch.compile's CPU backend gave student gradients 47% away "
                "from eager ones here (tests/test_run.py::test_compiled_gradients_match_eager); train eagerly")
    name = default_name(args.teacher)
    out = args.out or Path("students") / name
    work = args.work or Path("runs/boot") / name
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    try:
        teacher = load_teacher(args.teacher, precision.teacher_dtype(cfg.teacher_dtype, cfg.mixed_precision))
        if dist.main:
            warn_long_prompts(teacher.text, prompts, None if cfg.prompts == GRAMMAR else cfg.prompts)
        boot.Student(teacher.unet, boot.NoiseSchedule.from_scheduler_config(teacher.scheduler_config),
                     teacher.prediction_type)  # fails early for teachers BOOT cannot distil here
        if dist.main:
            print(f"teacher {args.teacher} ({teacher.prediction_type}), {len(prompts)} prompts "
                  f"({prompts_info['distinct']} distinct), {dist.world} process(es) on {dist.device}, "
                  f"preset {cfg.preset}: {cfg.steps} steps x batch {cfg.batch_size}")
        return train(cfg, args, teacher, prompts, prompts_info, dist, out, work)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
