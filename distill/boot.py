"""BOOT (Gu et al., arXiv 2306.05544): teacher x0-wrapper, signal-space student, bootstrapping loss.

Notation map (DESIGN.md §2 -> code):
    t, s            integer teacher timesteps 0..T (T = num_train_timesteps - 1), s = max(t - Δ, 0)
    α_t, σ_t        schedule.alpha[t], schedule.sigma[t]  (α_t² + σ_t² = 1; α_T = 0 allowed)
    f_w(x_t, t, c)  TeacherX0(x_t, t, cond, uncond, w)    (x0-prediction with CFG)
    g_θ(ε, t, c)    Student(ε, t, cond, w)                (predicted signal y_t)
    δ(t, s)         schedule.delta(t, s) = 1 - σ_s α_t / (α_s σ_t)

SDXL-family UNets (`text_time` added conditioning) also take the pooled text embeddings:
every call below passes an optional `pooled` (B, P) beside the token states, and the wrappers
hold the model's constant time ids (distill.sdxl); None everywhere else.

Nothing here divides by α_T: the student reads its UNet output at time T the way the teacher
does (v: α_T ε - σ_T v; sample: out) and the DDIM step is written with α_t in the numerator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distill.sdxl import pooled_args, unet_kwargs

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How the student reads its UNet (Student; docs/ablations.md "Output parameterization"):
#   teacher-at-T  UNet(ε, T), read as the teacher reads its output at T (the default, what ships)
#   direct        UNet(ε, T), the output taken as the signal itself
#   unet-at-t     UNet(ε, t), the UNet's own timestep input set to the target time t, read as at T
PARAMETERIZATIONS = ("teacher-at-T", "direct", "unet-at-t")
DEFAULT_PARAMETERIZATION = PARAMETERIZATIONS[0]


def recorded_parameterization(meta: dict) -> str:
    """A student's parameterization from its boot.json (absent in folders written before it was recorded)."""
    return meta.get("parameterization", DEFAULT_PARAMETERIZATION)


def unet_input_timestep(parameterization: str, T: int) -> int | None:
    """The UNet's own timestep input as boot.json records it: T, or None where it is the target t."""
    return None if parameterization == "unet-at-t" else T

# Student conditioning: sinusoidal features of the target time and of the guidance scale,
# concatenated and fed through the UNet's zero-initialised `time_embedding.cond_proj`.
EMBED_DIM = 128
TIME_COND_PROJ_DIM = 2 * EMBED_DIM
GUIDANCE_EMBED_SCALE = 1000.0 / 16.0  # w in [0, 16] spans the same range as t in [0, 1000]


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------
class NoiseSchedule(nn.Module):
    """α_t, σ_t of a discrete VP teacher, from its diffusers scheduler config."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        ac = alphas_cumprod.double().clamp(0.0, 1.0)
        self.register_buffer("alpha", ac.sqrt().float(), persistent=False)
        self.register_buffer("sigma", (1.0 - ac).sqrt().float(), persistent=False)
        self.T = len(ac) - 1

    @classmethod
    def from_scheduler_config(cls, config: dict) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr"}
        sched = DDPMScheduler(**{k: v for k, v in dict(config).items() if k in keep})
        return cls(sched.alphas_cumprod)

    @property
    def zero_terminal_snr(self) -> bool:
        return float(self.alpha[-1]) < 1e-6

    def delta(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """δ = 1 - exp(λ_t - λ_s) = 1 - σ_s α_t / (α_s σ_t): the signal-ODE step from t to s < t."""
        return 1.0 - (self.sigma[s] * self.alpha[t]) / (self.alpha[s] * self.sigma[t])


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
          prediction_type: str) -> torch.Tensor:
    """Read a UNet output as the clean-sample prediction (diffusers' pred_original_sample)."""
    a, s = _bcast(schedule.alpha[t], x_t), _bcast(schedule.sigma[t], x_t)
    if prediction_type == "v_prediction":
        return a * x_t - s * out
    if prediction_type == "sample":
        return out
    if prediction_type == "epsilon":
        # Data-dependent check, skipped while tracing for export (Student/TeacherX0 refuse
        # epsilon on zero-terminal-SNR schedules at construction anyway).
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and bool((schedule.alpha[t] <= 0).any()):
            raise ValueError("epsilon-prediction cannot give x0 where α_t = 0 (zero terminal SNR)")
        return (x_t - s * out) / a
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------
class TeacherX0(nn.Module):
    """f_w(x_t, t, c): any diffusers UNet teacher as a guided x0-predictor. Frozen."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 time_ids: torch.Tensor | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise ValueError("an epsilon-prediction teacher on a zero-terminal-SNR schedule has no x0 at T "
                             "(α_T = 0); BOOT's boundary condition needs one")
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.register_buffer("time_ids", time_ids, persistent=False)  # SDXL's (6,) add_time_ids, else None

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor | None, guidance_scale: torch.Tensor | float,
                pooled: torch.Tensor | None = None, uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
        if uncond is None:
            out = self.unet(x_t, t, cond, **unet_kwargs(pooled, self.time_ids)).sample
            return to_x0(out, x_t, t, self.schedule, self.prediction_type)
        # One batched call for the conditional and unconditional branches.
        both = None if pooled is None else torch.cat([pooled, uncond_pooled])
        out = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]),
                        **unet_kwargs(both, self.time_ids)).sample
        f_c, f_u = to_x0(out, torch.cat([x_t, x_t]), torch.cat([t, t]), self.schedule,
                         self.prediction_type).chunk(2)
        w = guidance_scale if torch.is_tensor(guidance_scale) else torch.full_like(t, guidance_scale, dtype=x_t.dtype)
        return f_u + _bcast(w, f_u) * (f_c - f_u)


# --------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------
def sinusoid(x: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal features, the same form as diffusers' timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def student_condition(t: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """(B, TIME_COND_PROJ_DIM) features of (target time, guidance) for `timestep_cond`."""
    return torch.cat([sinusoid(t), sinusoid(guidance_scale * GUIDANCE_EMBED_SCALE)], dim=-1)


def add_condition_projection(unet: nn.Module) -> nn.Module:
    """Give a teacher UNet the zero-initialised `time_embedding.cond_proj` of diffusers'
    `time_cond_proj_dim`, so the student starts as the teacher at time T for every (t, w)."""
    emb = unet.time_embedding
    if getattr(emb, "cond_proj", None) is None:
        emb.cond_proj = nn.Linear(TIME_COND_PROJ_DIM, emb.linear_1.in_features, bias=False)
        unet.register_to_config(time_cond_proj_dim=TIME_COND_PROJ_DIM)
    nn.init.zeros_(emb.cond_proj.weight)
    return unet


@dataclass(frozen=True)
class StudentSpec:
    """How a student reads its UNet; stored in boot.json."""

    prediction_type: str
    input_timestep: int | None  # the UNet's own timestep input: the teacher's T, or None for the target t
    parameterization: str = DEFAULT_PARAMETERIZATION


class Student(nn.Module):
    """g_θ(ε, t, c, w): predicted signal y_t of the teacher's DDIM trajectory from noise ε.

    Output parameterization ("teacher-at-T", the default): the UNet always sees its pretraining
    input at time T (pure noise x_T = ε, timestep T); the target time t and guidance w arrive only
    through the zero-initialised condition projection; the output is read as the teacher reads it
    at T. Hence g(ε, t, c, w) = f(ε, T, c) at initialisation, for every t and w, with no division
    by α_T. The alternatives of PARAMETERIZATIONS change one of those choices each, for ablations.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 parameterization: str = DEFAULT_PARAMETERIZATION, time_ids: torch.Tensor | None = None):
        super().__init__()
        if prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise ValueError("an epsilon-prediction teacher on a zero-terminal-SNR schedule has no "
                             "x0 at T; use a v- or sample-prediction teacher")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.parameterization = parameterization
        self.register_buffer("time_ids", time_ids, persistent=False)  # SDXL's (6,) add_time_ids, else None

    @property
    def spec(self) -> StudentSpec:
        return StudentSpec(self.prediction_type, unet_input_timestep(self.parameterization, self.schedule.T),
                           self.parameterization)

    def forward(self, noise: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance_scale: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        T = torch.full((noise.shape[0],), self.schedule.T, device=noise.device, dtype=torch.long)
        cond = student_condition(t, guidance_scale).to(noise.dtype)
        unet_time = t if self.parameterization == "unet-at-t" else T
        out = self.unet(noise, unet_time, encoder_hidden_states, timestep_cond=cond,
                        **unet_kwargs(pooled, self.time_ids)).sample
        if self.parameterization == "direct":
            return out
        return to_x0(out, noise, T, self.schedule, self.prediction_type)


class OneStepGenerator(nn.Module):
    """x_0 = g_θ(ε, 0, c, w): what export traces. Inputs (noise, text_states, guidance_scale), and
    text_embeds (the pooled embeddings) for SDXL-family students."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def forward(self, noise: torch.Tensor, text_states: torch.Tensor, guidance_scale: torch.Tensor,
                text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.zeros(noise.shape[0], device=noise.device, dtype=torch.long)
        return self.student(noise, t, text_states, guidance_scale, *pooled_args(text_embeds))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def bootstrap_target(target: Student, teacher: TeacherX0, noise: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor | None, w: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                     n: torch.Tensor, pooled: torch.Tensor | None = None,
                     uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """stopgrad(tgt) of BootLoss: from the target student's ŷ_t, n teacher DDIM steps of the signal
    ODE to s, per sample, y ← y + δ(u_k, u_k+1)·(f_w(α_u·y + σ_u·ε, u_k) − y) on evenly spaced
    t = u_0 > ... > u_n = s (the teacher is called only on samples whose target still has steps to go)."""
    sched = teacher.schedule
    tgt = target(noise, t, cond, w, *pooled_args(pooled))
    pick = lambda x, i: None if x is None else x[i]  # noqa: E731
    for k in range(int(n.max())):
        i = (k < n).nonzero().squeeze(1)
        ti, si, ni = t[i], s[i], n[i]
        u, v = ti - (ti - si) * k // ni, ti - (ti - si) * (k + 1) // ni
        y = tgt[i]
        x_u = _bcast(sched.alpha[u], y) * y + _bcast(sched.sigma[u], y) * noise[i]
        f_u = teacher(x_u, u, cond[i], pick(uncond, i), w[i], *pooled_args(pick(pooled, i)),
                      *pooled_args(pick(uncond_pooled, i)))
        tgt[i] = y + _bcast(sched.delta(u, v), y) * (f_u - y)
    return tgt


@dataclass
class BootLoss:
    """L = L_BS + β·L_BC (DESIGN.md §2), per sample.

        ŷ_t  = stopgrad(g_target(ε, t, c))
        tgt  = ŷ_t + δ·(f_w(α_t·ŷ_t + σ_t·ε, t, c) − ŷ_t)
        L_BS = ‖g(ε, s, c) − stopgrad(tgt)‖² / δ²,   δ = δ(t, s)
        L_BC = ‖g(ε, T, c) − stopgrad(f_w(ε, T, c))‖²

    With solver_steps K > 1 the target is the same signal-ODE step taken as K teacher DDIM steps
    t = u_0 > u_1 > ... > u_K = s (evenly spaced): y ← y + δ(u_k, u_k+1)·(f_w(α_u·y + σ_u·ε, u_k) − y),
    starting from ŷ_t. K = 1 is the paper's single step. A larger Δ then needs fewer bootstrap
    hops from T to 0 (less accumulated student error) without a coarser teacher step.

    With final_hop F > 0 every t <= F hops straight to s = 0, its target taken as ceil(F·K/Δ)
    teacher DDIM steps (none longer than Δ/K): the image g(ε, 0) is then trained against the
    teacher finishing its own sampler from the student's ŷ_t, rather than through the last
    F/Δ bootstrap hops, where a student's errors pile up most (docs/ablations.md). The caller
    draws such t from (F − Δ, F], whose ŷ_t the ordinary hops from (F, F + Δ] train.
    """

    delta_steps: int = 20  # Δ
    beta: float = 1.0  # β
    solver_steps: int = 1  # K: teacher DDIM steps inside one bootstrap target
    final_hop: int = 0  # F: t <= F hops straight to s = 0 (0: off, the paper's hops everywhere)
    min_delta: float = 1e-3  # floor on δ in the 1/δ² weight

    @property
    def final_steps(self) -> int:
        """Teacher DDIM steps in a final hop's target: ceil(F·K/Δ), so none is longer than Δ/K."""
        return -(-self.final_hop * self.solver_steps // self.delta_steps)

    def __call__(self, student: Student, target: Student, teacher: TeacherX0, noise: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None, w: torch.Tensor,
                 t: torch.Tensor, pooled: torch.Tensor | None = None,
                 uncond_pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sched = teacher.schedule
        # Per sample: the target time s and the teacher steps n of its target (K, or ceil(F·K/Δ) on a
        # final hop; with F = 0 there is none, since t >= 1).
        final = t <= self.final_hop
        s = torch.where(final, 0, (t - self.delta_steps).clamp_min(0))
        n = torch.where(final, self.final_steps, torch.full_like(t, self.solver_steps))
        T = torch.full_like(t, sched.T)
        # 1. Bootstrap target: from the (stop-gradient) target student's ŷ_t, n teacher DDIM steps to s.
        with torch.no_grad():
            tgt = bootstrap_target(target, teacher, noise, cond, uncond, w, t, s, n, pooled, uncond_pooled)
            d = sched.delta(t, s)
            # 2. Boundary target: the teacher at T on pure noise.
            f_T = teacher(noise, T, cond, uncond, w, *pooled_args(pooled), *pooled_args(uncond_pooled))
        # 3. Online student at s and at T (one batched call); the only graph with gradients.
        pred = student(torch.cat([noise, noise]), torch.cat([s, T]), torch.cat([cond, cond]),
                       torch.cat([w, w]), *pooled_args(None if pooled is None else torch.cat([pooled, pooled])))
        g_s, g_T = pred.chunk(2)
        dims = tuple(range(1, noise.ndim))
        l_bs = (g_s - tgt).pow(2).mean(dims) / d.clamp_min(self.min_delta).pow(2)
        l_bc = (g_T - f_T).pow(2).mean(dims)
        return {"loss": l_bs + self.beta * l_bc, "bootstrap": l_bs.detach(), "boundary": l_bc.detach()}


@dataclass
class FinalHopRegression:
    """L_BS of final hops only, against stored targets (distill.run --refine N), per sample:

        L = ‖g(ε, 0, c) − y‖² / δ(t, 0)²,   y = bootstrap_target(g_frozen, f_w, ε, t → 0)

    BootLoss with β = 0, every t drawn from (F − Δ, F], and the target network frozen at the
    starting student: each sample's target is then a fixed function of (ε, c, w, t), so N of them
    are computed once and the loop calls no teacher (docs/ablations.md, "Final-hop refinement").

    With `decode` (a frozen latent -> image map, e.g. the teacher's VAE decoder), the squared error
    is taken between the decoded images, D(g(ε, 0, c)) and D(y), instead of between latents; the
    gradient still reaches only the student, through D.
    """

    min_delta: float = 1e-3  # floor on δ in the 1/δ² weight

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.decode = decode

    def __call__(self, student: Student, schedule: NoiseSchedule, noise: torch.Tensor, cond: torch.Tensor,
                 w: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        zero = torch.zeros_like(t)
        g_0 = student(noise, zero, cond, w, *pooled_args(pooled))
        if self.decode is not None:
            with torch.no_grad():
                y = self.decode(y)
            g_0 = self.decode(g_0)
        d = schedule.delta(t, zero)
        l_bs = (g_0 - y).pow(2).mean(tuple(range(1, g_0.ndim))) / d.clamp_min(self.min_delta).pow(2)
        return {"loss": l_bs, "bootstrap": l_bs.detach(), "boundary": torch.zeros_like(l_bs)}
