"""BOOT distillation (docs/method.md): a diffusers teacher -> a one-step student, with no data.

    python -m distill.run                                  # the shipped teacher, quick preset, CPU
    python -m distill.run --preset full                    # the quality recipe
    python -m distill.run --preset refine --init-from DIR  # then its final-hop refinement (GPU)
    python -m distill.run --teacher DIR --prompts FILE     # any SD-style teacher, one prompt a line
    torchrun --nproc_per_node=N -m distill.run ...         # DDP (gloo on CPU, nccl on GPU)

Per step (all random draws from a generator seeded by (seed, step), so a resumed run sees the
batches an uninterrupted one would, and every rank draws the same global batch and keeps its slice):
  1. draw prompts c, noise ε, t ~ U{1..T}, w ~ U[guidance_min, guidance_max] (with --final-hop F,
     --final-fraction of the t from (F − Δ, F], hopping straight to 0, the rest from (F, T]);
  2. L = L_BS + β·L_BC from boot.loss.BootLoss (target network: --target online | ema);
     with --refine N (a second stage from --init-from STUDENT), L_BS of final hops only, against N
     targets of the frozen starting student computed once (boot.loss.FinalHopRegression);
  3. AdamW step with gradient clipping, then the EMA update.

Outputs: `--work` holds checkpoints (atomic, resumable with --resume), loss.jsonl, loss.png and
sample grids (student one step beside the teacher's 50-step DDIM); `--out` receives the student
folder of docs/interfaces.md (unet/, vae/, scheduler/, [text_encoder/, tokenizer/], boot.json).
With the shapes grammar as prompts, the student is judged on held-out captions at the end.
--val-every N (the full preset: 250) validates it every N steps on prompts and noise of its own: the
PSNR of its images against the teacher's 50-step DDIM images from the same noise, and with grammar
prompts the judge's accuracy; --keep best (the default when validating) exports the best step by
--select (psnr, the default, for any teacher; judge for the shapes world), not the last.

Resuming with a larger --steps continues the same run where the learning rate is constant after warmup
(--lr-schedule constant): 600 steps + 400 resumed steps equal 1000 uninterrupted ones. A cosine schedule
depends on --steps, so its run resumes only with the same --steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from boot.cli import Parser, name_list, number_list
from boot.compact import RULES as COMPACT_RULES
from boot.folders import check_model_folder
from boot.method import (
    CONDITIONINGS,
    DEFAULT_CONDITIONING,
    GUIDANCE_BAND,
    PARAMETERIZATIONS,
    NoiseSchedule,
    Student,
    parameterization_name,
)
from distill import memory, precision
from distill.config import (
    CONDITION_SPACES,
    DEFAULT_TEACHER,
    GRAMMAR,
    LR_SCHEDULES,
    PRESETS,
    REFERENCE_STEPS,
    VAL_SEED0,
    RunConfig,
    default_name,
    preset_help,
    preset_values,
)
from distill.distributed import setup_distributed
from distill.loading import load_prompts, load_teacher, warn_long_prompts
from distill.loop import train

# --help lists the product's flags (those in no group); --help-all also these groups, the last of which holds
# flags that exist for the ablations of docs/ablations.md (and the stages that reproduce the shipped student).
FLAG_GROUPS = {
    "training recipe": ("--steps", "--batch-size", "--lr", "--warmup", "--lr-schedule", "--cooldown", "--grad-clip",
                        "--adam-beta2", "--delta", "--t-power", "--beta",
                        "--boundary-fraction", "--final-hop", "--refine", "--ema", "--guidance-min",
                        "--guidance-max", "--guidance-scale", "--guidance-offsets", "--num-prompts",
                        "--compact"),
    "distribution matching of the one-step image (boot/dmd.py)": ("--dmd-weight", "--dmd-fake-updates",
                                                                  "--dmd-fake-lr", "--dmd-t-range", "--dmd-start",
                                                                  "--dmd-fake-warmup", "--dmd-fake"),
    "anchors of the one-step image (boot/loss.py)": ("--anchors", "--anchor-steps", "--anchor-weight"),
    "memory and precision (SD-scale teachers)": ("--mixed-precision", "--teacher-dtype", "--gradient-checkpointing",
                                                 "--lora-rank", "--text-states", "--ema-device", "--refine-chunk",
                                                 "--memory-budget", "--compile"),
    "monitoring and the kept step": ("--checkpoint-every", "--sample-every", "--eval-n", "--max-minutes",
                                     "--val-every", "--val-n", "--keep", "--select"),
    "ablations (docs/ablations.md)": ("--delta-power", "--huber-c", "--guidance-power", "--t-sweep", "--stratify",
                                      "--solver-steps", "--final-fraction", "--refine-space", "--parameterization",
                                      "--conditioning", "--guidance-band", "--condition-space", "--target", "--freeze"),
}


def parser() -> Parser:
    d = RunConfig()
    summary, details = __doc__.split("\n\nPer step", 1)
    p = Parser(prog="python -m distill.run", description=summary, details="Per step" + details,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {None: p, **{title: p.expert_group(title) for title in FLAG_GROUPS}}
    where = {flag: title for title, flags in FLAG_GROUPS.items() for flag in flags}
    a = lambda flag, *args, **kw: groups[where.get(flag)].add_argument(flag, *args, **kw)  # noqa: E731
    a("--teacher", type=Path, default=DEFAULT_TEACHER, help=f"teacher diffusers folder (default {DEFAULT_TEACHER})")
    a("--prompts", type=Path, default=None,
      help="UTF-8 file, one prompt per line (default: --num-prompts captions of the shapes grammar)")
    a("--out", type=Path, default=None, help="student folder (default students/<teacher name>-boot)")
    a("--work", type=Path, default=None, help="checkpoints, logs and sample grids (default runs/boot/<name>)")
    a("--preset", choices=list(PRESETS), default="quick",
      help="quick: <= 20 min on 2 CPU cores for the shipped teacher; full: the quality recipe; refine: the "
           "final-hop refinement of a distilled student at GPU scale, a second stage after full (needs "
           "--init-from) (default quick)")
    a("--steps", type=int, help=f"optimizer steps {preset_help('steps')}")
    a("--batch-size", type=int, help=f"global batch, split across processes {preset_help('batch_size')}")
    a("--lr", type=float, help=f"AdamW learning rate {preset_help('lr')}")
    a("--warmup", type=int, help=f"linear warmup steps, then --lr-schedule {preset_help('warmup')}")
    a("--lr-schedule", choices=LR_SCHEDULES,
      help="learning rate after the warmup: constant, cosine from --lr down to 0 at --steps, or cooldown "
           f"(constant, then linear down to 0 over the last --cooldown of the steps) {preset_help('lr_schedule')}")
    a("--cooldown", type=float, default=d.cooldown, metavar="FRACTION",
      help=f"with --lr-schedule cooldown: the last fraction of --steps over which the rate falls to 0 "
           f"(default {d.cooldown})")
    a("--grad-clip", type=float, default=d.grad_clip, help=f"gradient norm clip, 0 = off (default {d.grad_clip})")
    a("--adam-beta2", type=float, default=d.adam_beta2,
      help=f"AdamW's second-moment decay β2 (β1 is 0.9); lower adapts faster (default {d.adam_beta2})")
    a("--delta", type=int, default=d.delta, help=f"Δ in teacher steps, s = max(t - Δ, 0) (default {d.delta})")
    a("--t-power", type=float, help="γ: t = ceil(T·u^γ) with u uniform in (0, 1); 1 draws t uniformly, above 1 "
      f"more of the hops near the image (P(t <= τ) = (τ/T)^(1/γ)); not with --final-hop {preset_help('t_power')}")
    a("--t-sweep", type=int, default=d.t_sweep, metavar="N",
      help="over the first N steps draw t uniformly on [floor, T], the floor falling from T to 1, so the chain "
           "is trained from its start at T downwards; then on [1, T] (0 = off; not with --t-power or --final-hop) "
           f"(default {d.t_sweep})")
    a("--stratify", action="store_true",
      help="draw each batch's t and w one from each 1/B of their ranges (B the batch), in random pairs, instead "
           "of independently: the same distribution per sample, less variation between batches (with --final-hop "
           "only w)")
    a("--beta", type=float, default=d.beta, help=f"β, weight of the boundary loss L_BC (default {d.beta})")
    a("--delta-power", type=float,
      help="p: weight each bootstrap hop c_p/δ^p, c_p keeping the hops' mean weight over t that of the paper's "
           f"1/δ² (p = 2; lower p moves weight towards the last hops; boot/loss.py) {preset_help('delta_power')}")
    a("--huber-c", type=float, default=d.huber_c,
      help="c > 0: each sample's L_BS and L_BC as the pseudo-Huber sqrt(e + c²) − c of its squared error e, "
           f"so that a few large errors do not set each clipped step (boot/loss.py) (default {d.huber_c}: e)")
    a("--guidance-power", type=float, default=d.guidance_power,
      help="q != 0: weight each sample's L_BS and L_BC c_q/w^q, c_q keeping the mean weight 1 over the guidance "
           "range: the teacher's guided targets, and so the errors, grow with w, and unweighted the highest w "
           "make most of every clipped step; q > 0 evens that out, q < 0 leans further on high w (boot/loss.py) "
           f"(default {d.guidance_power}: off)")
    a("--boundary-fraction", type=float,
      help="share of each batch whose L_BC is computed, weighted 1/share so its expectation is kept; below 1 "
           "the teacher's call at T and the student's T branch cost that share of the batch "
           f"{preset_help('boundary_fraction')}")
    a("--solver-steps", type=int, default=d.solver_steps,
      help=f"K, teacher DDIM steps that make one bootstrap target from t to s; K > 1 lets a larger Δ keep "
           f"the teacher's step size (default {d.solver_steps}, the paper's single step)")
    a("--final-hop", type=int, default=None,
      help="F: every t <= F hops straight to s = 0, its target the teacher's DDIM finishing from the "
           "student's y_t in ceil(F·K/Δ) steps, so the image is trained against the teacher's own last steps "
           "rather than F/Δ chained bootstrap hops; t is then drawn from (F - Δ, T] with --final-fraction of "
           f"each batch in (F - Δ, F]; 0 = off {preset_help('final_hop')}")
    a("--final-fraction", type=float, default=d.final_fraction,
      help=f"with --final-hop: share of each batch drawn as final hops (default {d.final_fraction})")
    a("--refine", type=int, default=None, metavar="N",
      help="final-hop refinement of a distilled student (needs --init-from and --final-hop): the target network "
           "is frozen at that student, so N final-hop targets (ε, c, w, t in (F - Δ, F] -> the teacher's DDIM "
           "from its ŷ_t to 0) are computed once into --work, and the loop trains only g(ε, 0) on them with "
           f"FinalHopRegression, calling no teacher (docs/ablations.md); 0 = off {preset_help('refine')}")
    a("--refine-space", choices=("latent", "image"), default=d.refine_space,
      help="with --refine: take the squared error between latents, or between the images the teacher's "
           f"frozen VAE decodes from them (default {d.refine_space})")
    a("--parameterization", type=parameterization_name, choices=PARAMETERIZATIONS, default=d.parameterization,
      help="how the student reads its UNet, for ablations (docs/ablations.md): teacher-at-T = UNet(ε, T) read as "
           "the teacher reads it at T, so the student starts as the teacher's x0-prediction from noise; direct = "
           "the same output taken as the signal; unet-at-t = the UNet's timestep input set to the target time t; "
           "teacher-at-T-scaled-lr = read as teacher-at-T, the learning rate of its UNet steps multiplied by "
           "α_T/σ_T where the teacher predicts epsilon, so a step moves it as far as a v-prediction student's "
           "(docs/byo-teacher.md; its earlier name preconditioned is accepted) "
           f"(default {d.parameterization})")
    a("--conditioning", choices=CONDITIONINGS, default=d.conditioning,
      help="how a new student's UNet takes t and w, for ablations (docs/ablations.md): diffusers-guidance = "
           "diffusers' own guidance embedding of w - 1 beside fixed features of t, so plain diffusers runs the "
           "folder; sinusoid = one learned projection of sinusoidal features of t and 62.5·w (older students; "
           f"BootPipeline only). --init-from keeps the student's own (default {d.conditioning})")
    a("--guidance-band", type=float, default=d.guidance_band,
      help="with --conditioning diffusers-guidance: train only the columns of E(w - 1) whose frequency is at most "
           f"this many rad per unit of w, the faster ones stay 0 (boot.method.GUIDANCE_BAND = {GUIDANCE_BAND:g} is the "
           f"band of the sinusoid features); 0 = all columns (default {d.guidance_band:g})")
    a("--condition-space", choices=CONDITION_SPACES, default=d.condition_space,
      help="with --conditioning diffusers-guidance, where its condition projection learns: sinusoid = as a "
           "sinusoid student (features of t and 62.5·w), the folder written converted to the diffusers form "
           "(exact in t, a least-squares fit in w; the fit is recorded in boot.json); diffusers = on diffusers' "
           "E(w - 1) and φ(t) - φ(0) directly; projected = on a fixed linear map of E(w - 1) onto the sinusoid "
           f"features (boot.method.SinusoidSpaceProjection) (default {d.condition_space})")
    a("--guidance-min", type=float, default=d.guidance_min, help=f"lowest w trained (default {d.guidance_min})")
    a("--guidance-max", type=float, default=d.guidance_max, help=f"highest w trained (default {d.guidance_max})")
    a("--guidance-scale", type=float, default=None,
      help="recommended guidance stored in boot.json, used for samples and evaluation (default: the teacher's)")
    a("--guidance-offsets", type=number_list(float, -16, 16), metavar="O1,O2,...",
      help="at the end, choose the recommended guidance among w + each offset (w: --guidance-scale or the "
           "teacher's; clamped into the trained range) by the --select rule on the validation prompts, so the "
           "evaluation, samples and boot.json use it; the teacher's references stay at w; 0 alone keeps w "
           f"{preset_help('guidance_offsets')}")
    a("--ema", type=float, help=f"EMA decay of the exported weights, 0 = no EMA {preset_help('ema')}")
    a("--target", choices=["online", "ema"], default=d.target,
      help=f"network giving the stop-gradient bootstrap target ŷ_t (default {d.target})")
    a("--freeze", type=name_list, default=d.freeze, metavar="NAMES",
      help="comma-separated parts of UNet parameter names (e.g. attn2.to_k,attn2.to_v: how the cross-attention "
           "reads the text) whose weights stay at their starting values (default: none)")
    a("--num-prompts", type=int, help=f"grammar captions when --prompts is not given {preset_help('num_prompts')}")
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
    a("--compact", choices=COMPACT_RULES, default=None,
      help="a student smaller than the teacher: its UNet with blocks removed by this rule, the kept weights "
           "copied (from --init-from's student when given): no-mid drops the mid block, no-mid-attn also the "
           "lowest-resolution cross-attention (boot/compact.py) (default: the teacher's architecture)")
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
    a("--dmd-weight", type=float, default=d.dmd_weight,
      help="λ: add λ·L_DM, DMD's data-free distribution-matching term on the one-step image x̂ = g(ε, 0, c, w), "
           "to the BOOT loss: x̂ is pushed along (fake − real)/mean|x̂ − real|, the teacher's CFG x0-prediction "
           "(real) against an online fake x0-model trained on the student's own x̂ (boot/dmd.py; docs/ablations.md); "
           f"0 = off (default {d.dmd_weight:g})")
    a("--dmd-fake-updates", type=int, default=d.dmd_fake_updates,
      help=f"with --dmd-weight: fake-model AdamW steps per student step (default {d.dmd_fake_updates})")
    a("--dmd-fake-lr", type=float, default=d.dmd_fake_lr,
      help=f"with --dmd-weight: the fake model's AdamW learning rate (default {d.dmd_fake_lr:g})")
    a("--dmd-t-range", type=float, nargs=2, default=(d.dmd_t_min, d.dmd_t_max), metavar=("MIN", "MAX"),
      help="with --dmd-weight: t of the DMD gradient and of the fake model's loss, uniform in [MIN·T, MAX·T] "
           f"(fractions of the teacher's T) (default {d.dmd_t_min:g} {d.dmd_t_max:g})")
    a("--anchors", type=int, default=d.anchors, metavar="M",
      help="M rows of every global batch also regress the one-step image g(ε, 0, c, w) on the teacher's own "
           "--anchor-steps-step DDIM sample from the same noise (a data-free target; boot/loss.py), weighted "
           f"--anchor-weight; each row costs 2·--anchor-steps teacher evaluations; 0 = off (default {d.anchors})")
    a("--anchor-steps", type=int, default=d.anchor_steps,
      help=f"with --anchors: the teacher's DDIM steps from T to 0 in an anchor's target (default {d.anchor_steps})")
    a("--anchor-weight", type=float, default=d.anchor_weight,
      help=f"with --anchors: λ_A, the weight of an anchor row's squared error (default {d.anchor_weight:g})")
    a("--dmd-start", type=int, default=d.dmd_start,
      help=f"with --dmd-weight: the first step the term runs (default {d.dmd_start})")
    a("--dmd-fake-warmup", type=int, default=d.dmd_fake_warmup, metavar="N",
      help="with --dmd-weight: the fake model trains alone on the student's own x̂ for the N steps before "
           "--dmd-start, so the term starts from a fake model of the student, not of the teacher "
           f"(default {d.dmd_fake_warmup})")
    a("--dmd-fake", choices=("conditional", "guided"), default=d.dmd_fake,
      help="with --dmd-weight: the fake model starts as the teacher's conditional x0-prediction, or as its CFG "
           "prediction at the sample's w (two branches a call: the term starts at 0 for a student that matches the "
           f"guided teacher) (default {d.dmd_fake})")
    a("--device", default="auto", help="auto, cpu, cuda (default auto: cuda if available)")
    a("--checkpoint-every", type=int, help=f"steps between checkpoints {preset_help('checkpoint_every')}")
    a("--sample-every", type=int,
      help=f"steps between sample grids, 0 = none: no grid, and no teacher reference grid rendered "
           f"{preset_help('sample_every')}")
    a("--eval-n", type=int, help=f"held-out grammar captions judged at the end, 0 = none {preset_help('eval_n')}")
    a("--max-minutes", type=float,
      help=f"stop the training loop after this many minutes, 0 = never {preset_help('max_minutes')}")
    a("--val-every", type=int, default=None,
      help="every this many steps (a checkpoint is written then too) score the exported student on --val-n "
           f"validation prompts: PSNR against the teacher's {REFERENCE_STEPS}-step images (and with grammar prompts "
           "the judge's accuracy) -> val.jsonl, val.png; 0 = never (with --prompts and --select judge: 0) "
           f"{preset_help('val_every')}")
    a("--val-n", type=int, default=None,
      help=f"validation prompts: the eval split drawn with seed --seed + 1 (with --prompts: prompts of the file) "
           f"and noise seeds from {VAL_SEED0}, so they are not the --eval-n report's {preset_help('val_n')}")
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
        preset=args.preset, **{k: pick(k) for k in preset}, grad_clip=args.grad_clip,
        adam_beta2=args.adam_beta2, delta=args.delta,
        beta=args.beta, huber_c=args.huber_c, guidance_power=args.guidance_power, cooldown=args.cooldown,
        t_sweep=args.t_sweep, stratify=args.stratify, solver_steps=args.solver_steps,
        final_fraction=args.final_fraction, refine_space=args.refine_space,
        parameterization=args.parameterization, conditioning=args.conditioning, guidance_band=args.guidance_band,
        condition_space=args.condition_space,
        guidance_min=args.guidance_min, guidance_max=args.guidance_max,
        guidance_scale=args.guidance_scale, target=args.target, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        teacher_dtype=args.teacher_dtype, compact=args.compact, lora_rank=args.lora_rank, freeze=args.freeze,
        text_states=args.text_states,
        ema_device=args.ema_device, refine_chunk=args.refine_chunk, memory_budget=args.memory_budget,
        compile=args.compile, init_from=str(args.init_from) if args.init_from else None,
        keep=keep, select=args.select,
        dmd_weight=args.dmd_weight, dmd_fake_updates=args.dmd_fake_updates, dmd_fake_lr=args.dmd_fake_lr,
        dmd_t_min=args.dmd_t_range[0], dmd_t_max=args.dmd_t_range[1], dmd_start=args.dmd_start,
        dmd_fake_warmup=args.dmd_fake_warmup, dmd_fake=args.dmd_fake,
        anchors=args.anchors, anchor_steps=args.anchor_steps, anchor_weight=args.anchor_weight,
    )
    cfg.guidance_offsets = tuple(cfg.guidance_offsets)
    checks = [
        (cfg.steps >= 1, "--steps must be >= 1"), (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"), (cfg.warmup >= 0, "--warmup must be >= 0"),
        (0 < cfg.cooldown <= 1, "--cooldown must be in (0, 1]"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0"), (0 < cfg.adam_beta2 < 1, "--adam-beta2 must be in (0, 1)"),
        (cfg.delta >= 1, "--delta must be >= 1"),
        (1 <= cfg.solver_steps <= cfg.delta, "--solver-steps must be in [1, --delta]"),
        (cfg.final_hop == 0 or cfg.final_hop >= cfg.delta, "--final-hop must be 0 (off) or >= --delta"),
        (0 < cfg.final_fraction < 1, "--final-fraction must be in (0, 1)"),
        (cfg.refine >= 0, "--refine must be >= 0"),
        (cfg.guidance_band >= 0, "--guidance-band must be >= 0"),
        (cfg.guidance_band == 0 or cfg.conditioning == DEFAULT_CONDITIONING,
         "--guidance-band needs --conditioning diffusers-guidance"),
        (cfg.condition_space == "diffusers" or cfg.guidance_band == 0,
         "--guidance-band needs --condition-space diffusers"),
        (cfg.refine == 0 or (cfg.final_hop > 0 and cfg.init_from is not None),
         "--refine needs --final-hop F and --init-from STUDENT (it refines a distilled student's last hop)"),
        (cfg.refine == 0 or cfg.refine >= cfg.batch_size, "--refine N needs N >= --batch-size"),
        (cfg.beta >= 0, "--beta must be >= 0"),
        (0 <= cfg.delta_power <= 4, "--delta-power must be in [0, 4]"),
        (0 <= cfg.huber_c <= 10, "--huber-c must be in [0, 10]"),
        (-4 <= cfg.guidance_power <= 4, "--guidance-power must be in [-4, 4]"),
        (cfg.guidance_power == 0 or cfg.guidance_min > 0, "--guidance-power needs --guidance-min > 0"),
        (0 < cfg.boundary_fraction <= 1, "--boundary-fraction must be in (0, 1]"),
        (1 <= cfg.t_power <= 4, "--t-power must be in [1, 4]"),
        (cfg.t_power == 1 or cfg.final_hop == 0, "--t-power needs --final-hop 0 (the final hop draws t its own way)"),
        (cfg.t_sweep >= 0, "--t-sweep must be >= 0"),
        (cfg.t_sweep == 0 or (cfg.t_power == 1 and cfg.final_hop == 0),
         "--t-sweep needs --t-power 1 and --final-hop 0 (they draw t their own ways)"),
        (0 <= cfg.ema < 1, "--ema must be in [0, 1)"),
        (0 <= cfg.guidance_min <= cfg.guidance_max <= 16,
         "need 0 <= --guidance-min <= --guidance-max <= 16 (the student's guidance embedding range)"),
        (cfg.target == "online" or cfg.ema > 0, "--target ema needs --ema > 0"),
        (cfg.lora_rank >= 0, "--lora-rank must be >= 0"),
        (not cfg.freeze or cfg.lora_rank == 0, "--freeze needs --lora-rank 0 (a LoRA student freezes every weight)"),
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
        (not cfg.guidance_offsets or cfg.prompts == GRAMMAR or cfg.select != "judge",
         "--guidance-offsets with --select judge judges grammar captions; it needs the shapes grammar prompts (no "
         "--prompts)"),
        (cfg.dmd_weight >= 0, "--dmd-weight must be >= 0"),
        (cfg.dmd_fake_updates >= 1, "--dmd-fake-updates must be >= 1"),
        (cfg.dmd_fake_lr > 0, "--dmd-fake-lr must be > 0"),
        (0 < cfg.dmd_t_min <= cfg.dmd_t_max <= 1, "--dmd-t-range needs 0 < MIN <= MAX <= 1"),
        (cfg.dmd_start >= 0, "--dmd-start must be >= 0"),
        (0 <= cfg.dmd_fake_warmup <= cfg.dmd_start, "--dmd-fake-warmup N needs 0 <= N <= --dmd-start"),
        (0 <= cfg.anchors <= cfg.batch_size, "--anchors must be in [0, --batch-size]"),
        (cfg.anchor_steps >= 1, "--anchor-steps must be >= 1"), (cfg.anchor_weight > 0, "--anchor-weight must be > 0"),
        (cfg.anchors == 0 or cfg.refine == 0,
         "--anchors needs the teacher in the loop; --refine trains on stored targets without it"),
        (cfg.init_from is None or (Path(cfg.init_from) / "unet").is_dir(),
         f"--init-from {cfg.init_from}: no unet/ folder there (a student folder is expected)"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return cfg


def main(argv: list[str] | None = None) -> Path:
    p = parser()
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
    if cfg.dmd_weight > 0 and dist.world > 1:
        p.error("--dmd-weight runs on one process (its fake model is not synchronised across processes)")
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
        Student(teacher.unet, NoiseSchedule.from_scheduler_config(teacher.scheduler_config),
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
