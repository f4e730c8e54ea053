"""The run's typed configuration: RunConfig (stored in every checkpoint and in boot.json), the
presets, each value with its reason, and the constants the parts share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from boot.method import DEFAULT_CONDITIONING, DEFAULT_PARAMETERIZATION

DEFAULT_TEACHER = Path("pretrained/shapes-teacher")


GRAMMAR = "shapes-grammar"


LR_SCHEDULES = ("constant", "cosine", "cooldown")  # the learning rate after the warmup (distill.batches.lr_at)


N_SAMPLES = 8  # fixed prompts in the sample grid
# Where a new "diffusers-guidance" student's condition projection learns (docs/ablations.md, "Which conditioning
# lets plain diffusers run the student"): sinusoid = as a "sinusoid" student, written converted to the diffusers
# form (boot.conditioning.convert_conditioning); diffusers = on E(w - 1) directly;
# projected = boot.method.SinusoidSpaceProjection.
CONDITION_SPACES = ("sinusoid", "diffusers", "projected")


SAMPLE_SEED0 = 1_000_000  # seeds of the sample grid and evaluation: SAMPLE_SEED0 + i


VAL_SEED0 = 2_000_000  # noise seeds of the periodic validation: VAL_SEED0 + i


REFERENCE_STEPS = 50  # the teacher's DDIM steps the student is compared against


@dataclass
class RunConfig:
    """Every choice that shapes the student; stored in each checkpoint and in boot.json."""

    teacher: str = str(DEFAULT_TEACHER)
    prompts: str = GRAMMAR  # a prompts file, or GRAMMAR (shapes_world.world.sample_captions)
    num_prompts: int = 4096  # captions drawn from the grammar
    preset: str = "quick"
    steps: int = 600
    batch_size: int = 24  # global batch, split across ranks
    lr: float = 2e-5
    warmup: int = 50  # linear LR warmup steps, then the lr_schedule
    lr_schedule: str = "constant"  # after the warmup: "constant", "cosine" down to 0 at the last step, or "cooldown"
    cooldown: float = 0.2  # "cooldown": constant, then linear down to 0 over this last fraction of the steps
    grad_clip: float = 1.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (β1 stays 0.9)
    delta: int = 20  # Δ: s = max(t - Δ, 0)
    t_power: float = 1.0  # t = ceil(T·u^γ), u ~ U(0, 1): γ = 1 is uniform, γ > 1 draws low t more often
    t_sweep: int = 0  # N > 0: over the first N steps t is drawn on [t_floor, T], the floor falling from T to 1
    stratify: bool = False  # each batch's t and w drawn one from each 1/B of their ranges (distill.batches)
    beta: float = 1.0  # β: weight of the boundary loss
    delta_power: float = 2.0  # p: a hop from t weighted c_p/δ^p (boot.loss.BootLoss; 2 = the paper's 1/δ²)
    huber_c: float = 0.0  # c > 0: L_BS and L_BC per sample as sqrt(e + c²) − c of the squared error e (0: e)
    guidance_power: float = 0.0  # q != 0: L_BS and L_BC per sample weighted c_q/w^q (boot.loss.BootLoss; 0: off)
    boundary_fraction: float = 1.0  # share of each batch whose boundary loss is computed (weighted 1/share)
    solver_steps: int = 1  # K: teacher DDIM steps inside one bootstrap target (t -> s)
    final_hop: int = 0  # F: t <= F hops straight to 0 through ceil(F·K/Δ) teacher steps (0: off)
    final_fraction: float = 0.25  # with F > 0: share of each batch drawn as final hops, t in (F - Δ, F]
    refine: int = 0  # N > 0: only final hops, on N targets of the frozen --init-from student, computed once
    refine_space: str = "latent"  # --refine's squared error between latents, or between VAE-decoded images
    parameterization: str = DEFAULT_PARAMETERIZATION  # how the student reads its UNet (boot.method.PARAMETERIZATIONS)
    conditioning: str = DEFAULT_CONDITIONING  # how t and w enter a new student's UNet (boot.method.CONDITIONINGS)
    guidance_band: float = 0.0  # "diffusers-guidance": train E(w - 1)'s columns up to this frequency, 0 = all
    condition_space: str = "sinusoid"  # "diffusers-guidance": where its cond_proj learns (CONDITION_SPACES)
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    guidance_scale: float | None = None  # recommended w; None: the teacher's
    # At the end of the run the recommended w is chosen by --select among w + each offset (clamped into the trained
    # range), on the validation prompts; () keeps w.
    guidance_offsets: tuple[float, ...] = ()
    ema: float = 0.99  # EMA decay; 0 disables EMA (the student is the online network)
    target: str = "online"  # network giving the stop-gradient bootstrap target ŷ_t
    seed: int = 0
    init_from: str | None = None  # a student folder whose UNet starts the student (and EMA) instead of the teacher's
    mixed_precision: str = "no"
    teacher_dtype: str = "auto"  # the frozen teacher UNet's dtype (distill.precision.teacher_dtype)
    gradient_checkpointing: bool = False
    compact: str | None = None  # a block-removal rule for a student smaller than the teacher (boot.compact.RULES)
    lora_rank: int = 0  # R > 0: LoRA adapters of rank R + the condition projection train, the rest is frozen
    freeze: tuple[str, ...] = ()  # UNet parameters whose names contain one of these stay at their starting values
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
    # Distribution matching of the one-step image (boot.dmd, docs/ablations.md): L = L_BOOT + dmd_weight·L_DM.
    dmd_weight: float = 0.0  # 0 = off
    dmd_fake_updates: int = 2  # fake-model AdamW steps per student step (two time-scale update)
    dmd_fake_lr: float = 1e-4  # the fake model's AdamW learning rate
    dmd_t_min: float = 0.02  # t of the DMD gradient and the fake model's loss ~ U{t_min·T..t_max·T}
    dmd_t_max: float = 0.98
    dmd_start: int = 0  # the term starts at this step
    dmd_fake_warmup: int = 0  # steps the fake model trains alone on the student's x̂ before the term starts
    dmd_fake: str = "conditional"  # the fake model's start and form: the teacher's conditional x0, or its CFG at w
    # Anchor rows (boot.loss.BootLoss, docs/ablations.md): on `anchors` rows of each batch the one-step image is also
    # regressed on the teacher's own anchor_steps-step DDIM sample from the same noise, weighted anchor_weight.
    anchors: int = 0  # rows per global batch, 0 = off
    anchor_steps: int = 8
    anchor_weight: float = 1.0


# Flags left out of the resume check: they do not change the weights of step k.
BOOKKEEPING = ("steps", "preset", "checkpoint_every", "sample_every", "eval_n", "gradient_checkpointing", "compile",
               "max_minutes", "val_every", "val_n", "keep", "ema_device", "refine_chunk", "memory_budget", "select",
               "guidance_offsets")


PRESETS: dict[str, dict] = {
    # 2 CPU cores, shipped 7M-parameter teacher. A step at batch 16 is a target student forward, the teacher's
    # CFG pair at t, the teacher's pair at T on a quarter of the batch (boundary_fraction) and the online
    # student's forward and backward at s and T: 0.6-0.9 s on 2 cores, so 1,200 steps take 12-18 min and the
    # 15-minute cap keeps the whole command, with the 50-step teacher reference and the 64-caption
    # evaluation, inside 20 minutes on a slow day. lr 1e-4 and the quarter boundary: docs/ablations.md,
    # "What does the quick preset's quarter hour buy?". The hops weighted c_1/δ instead of the paper's 1/δ²: over
    # five seeds 73.2% of eval captions against 70.6%, +5.2 points on the held-out compositions (p = 0.037), and
    # half the seed-to-seed spread ("How should the bootstrap hops be weighted over t?").
    "quick": dict(steps=1200, batch_size=16, lr=1e-4, warmup=50, ema=0.99, num_prompts=4096,
                  checkpoint_every=100, sample_every=100, eval_n=64, max_minutes=15.0, val_every=0,
                  boundary_fraction=0.25, delta_power=1.0),
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
PRESET_EXTRAS = ("final_hop", "refine", "val_n", "boundary_fraction", "lr_schedule", "t_power", "guidance_offsets",
                 "delta_power")


def preset_values(name: str) -> dict:
    """A preset's values, with RunConfig's for the PRESET_EXTRAS it does not set."""
    defaults = RunConfig()
    return {**{key: getattr(defaults, key) for key in PRESET_EXTRAS}, **PRESETS[name]}


def preset_help(key: str) -> str:
    return "(default: " + ", ".join(f"{name} {preset_values(name)[key]}" for name in PRESETS) + ")"


def default_name(teacher: Path) -> str:
    name = teacher.resolve().name
    return (name[: -len("-teacher")] if name.endswith("-teacher") else name) + "-boot"

