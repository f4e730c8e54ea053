"""BOOT (Gu et al., arXiv 2306.05544): noise schedule, teacher x0-wrapper, signal-space student and its conditioning.

Notation map (docs/method.md -> code):
    t, s            integer teacher timesteps 0..T (T = num_train_timesteps - 1), s = max(t - Δ, 0)
    α_t, σ_t        schedule.alpha[t], schedule.sigma[t]  (α_t² + σ_t² = 1; α_T = 0 allowed)
    f_w(x_t, t, c)  TeacherX0(x_t, t, cond, uncond, w)    (x0-prediction with CFG)
    g_θ(ε, t, c)    Student(ε, t, cond, w)                (predicted signal y_t)
    δ(t, s)         schedule.delta(t, s) = 1 - σ_s α_t / (α_s σ_t)

SDXL-family UNets (`text_time` added conditioning) also take the pooled text embeddings:
every call below passes an optional `pooled` (B, P) beside the token states, and the wrappers
hold the model's constant time ids (boot.sdxl); None everywhere else.

The student reads its UNet output at time T the way the teacher does (v: α_T ε − σ_T v; sample:
out; epsilon: (ε − σ_T out)/α_T) and the DDIM step is written with α_t in the numerator. Only the
epsilon reading divides by α_T (≈ 0.068 for SD's scaled_linear schedule): there ∂g/∂out =
−σ_T/α_T, so a change of the UNet's output moves the student's signal about 15x as far as it
moves a v-prediction student's (−σ_T ≈ −1). Any reading linear in the UNet's output that starts
at the teacher's x0 for every ε has that slope (the x0 it must reproduce is (ε − σ_T out)/α_T),
so the "teacher-at-T-scaled-lr" parameterization keeps the reading and scales the learning rate of
every optimizer step on the UNet by κ = α_T/σ_T instead (`update_scale`). With Adam and no weight decay that is training
θ = θ_0 + κ·φ in φ: an update then moves the student's signal as far as a v-prediction
student's. The losses stay in latent-x0 units, the same units for every prediction type.

The losses that train the student are in boot.loss; how its conditioning is stored in a folder, and
converted from one kind to the other, in boot.conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from boot.sdxl import pooled_args, unet_kwargs

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How the student reads its UNet (Student; docs/ablations.md "Output parameterization"):
#   teacher-at-T  UNet(ε, T), read as the teacher reads its output at T (the default, what ships)
#   direct        UNet(ε, T), the output taken as the signal itself
#   unet-at-t     UNet(ε, t), the UNet's own timestep input set to the target time t, read as at T
#   teacher-at-T-scaled-lr  read as teacher-at-T; the learning rate of its UNet steps scaled by κ = α_T/σ_T
#                 where the teacher predicts epsilon, else exactly teacher-at-T (docs/byo-teacher.md,
#                 "Epsilon-prediction teachers")
PARAMETERIZATIONS = ("teacher-at-T", "direct", "unet-at-t", "teacher-at-T-scaled-lr")
DEFAULT_PARAMETERIZATION = PARAMETERIZATIONS[0]
# Earlier names still read from boot.json files and accepted by distill.run --parameterization.
PARAMETERIZATION_ALIASES = {"preconditioned": "teacher-at-T-scaled-lr"}


def parameterization_name(name: str) -> str:
    """The current name of a parameterization given by any of its names (PARAMETERIZATION_ALIASES)."""
    return PARAMETERIZATION_ALIASES.get(name, name)


def recorded_parameterization(meta: dict) -> str:
    """A student's parameterization from its boot.json, by its current name (absent in folders written before
    it was recorded: teacher-at-T)."""
    return parameterization_name(meta.get("parameterization", DEFAULT_PARAMETERIZATION))


def unet_input_timestep(parameterization: str, T: int) -> int | None:
    """The UNet's own timestep input as boot.json records it: T, or None where it is the target t."""
    return None if parameterization == "unet-at-t" else T


# Student conditioning (boot.json "conditioning" -> "kind"): how the target time t and the guidance
# scale w reach the UNet's zero-initialised `time_embedding.cond_proj` (diffusers' time_cond_proj_dim):
#   "diffusers-guidance"  cond_proj(E(w - 1)) + A_t·(φ(t) - φ(0)), E = diffusers' get_guidance_scale_embedding:
#                         exactly what StableDiffusionPipeline feeds a UNet with time_cond_proj_dim, and the
#                         t term vanishes at t = 0, so the one-step generator is the plain diffusers UNet.
#   "sinusoid"            cond_proj([φ(t), φ(62.5·w)]) (folders whose record has no "kind").
CONDITIONINGS = ("diffusers-guidance", "sinusoid")
DEFAULT_CONDITIONING = CONDITIONINGS[0]
LEGACY_CONDITIONING = CONDITIONINGS[1]
EMBED_DIM = 128
TIME_COND_PROJ_DIM = 2 * EMBED_DIM
GUIDANCE_EMBED_SCALE = 1000.0 / 16.0  # "sinusoid": w in [0, 16] spans the same range as t in [0, 1000]
# E(w - 1) holds sinusoids of w from 0.1 to 1000 rad per unit of w; the "sinusoid" features stop at 62.5
# (GUIDANCE_EMBED_SCALE). A band-limited student trains only E's columns up to this frequency and keeps
# the faster ones at exactly 0, so diffusers' plain cond_proj still computes it.
GUIDANCE_BAND = GUIDANCE_EMBED_SCALE


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


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample values viewed as (B, 1, ..., 1) in `like`'s dtype, to scale each sample of `like`."""
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
          prediction_type: str) -> torch.Tensor:
    """Read a UNet output as the clean-sample prediction (diffusers' pred_original_sample)."""
    a, s = bcast(schedule.alpha[t], x_t), bcast(schedule.sigma[t], x_t)
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


def update_scale(schedule: NoiseSchedule, prediction_type: str, parameterization: str) -> float:
    """κ = α_T/σ_T for a "teacher-at-T-scaled-lr" student of an epsilon teacher, else 1: training multiplies
    the learning rate of every optimizer step on the UNet by κ (module docstring), so that κ·∂g/∂out = −1,
    the slope of a v-prediction student's reading at T (−σ_T ≈ −1)."""
    if parameterization_name(parameterization) != "teacher-at-T-scaled-lr" or prediction_type != "epsilon":
        return 1.0
    return float(schedule.alpha[schedule.T] / schedule.sigma[schedule.T])


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
        return guided_x0(self, x_t, t, cond, uncond, guidance_scale, pooled, uncond_pooled)


def guided_x0(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
              uncond: torch.Tensor | None, guidance_scale: torch.Tensor | float,
              pooled: torch.Tensor | None = None, uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The x0-prediction of `model`'s UNet (with its schedule, prediction_type and time_ids) with CFG at
    guidance_scale, or conditional only where uncond is None; with the graph where grad is enabled."""
    # A frozen UNet may be held in half precision (distill.run --teacher-dtype): inputs go in at its
    # dtype, its output comes back in fp32 before the x0 read (an epsilon read at T multiplies
    # rounding by σ_T/α_T ≈ 14.6 on SD's schedule).
    dtype = next(model.unet.parameters(), x_t).dtype  # (a parameterless stand-in runs at x_t's)
    if uncond is None:
        out = model.unet(x_t.to(dtype), t, cond.to(dtype), **unet_kwargs(pooled, model.time_ids, dtype)).sample.float()
        return to_x0(out, x_t, t, model.schedule, model.prediction_type)
    # One batched call for the conditional and unconditional branches.
    both = None if pooled is None else torch.cat([pooled, uncond_pooled])
    out = model.unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), torch.cat([cond, uncond]).to(dtype),
                     **unet_kwargs(both, model.time_ids, dtype)).sample.float()
    f_c, f_u = to_x0(out, torch.cat([x_t, x_t]), torch.cat([t, t]), model.schedule, model.prediction_type).chunk(2)
    w = guidance_scale if torch.is_tensor(guidance_scale) else torch.full_like(t, guidance_scale, dtype=x_t.dtype)
    return f_u + bcast(w, f_u) * (f_c - f_u)


# --------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------
def sinusoid(x: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal features, the same form as diffusers' timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def guidance_frequencies(dim: int = TIME_COND_PROJ_DIM) -> torch.Tensor:
    """(dim,) angular frequency, in rad per unit of w, of each column of E(w) (its sin and cos halves)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step) * 1000.0
    return torch.cat([freqs, freqs])


def guidance_embedding(w: torch.Tensor, dim: int = TIME_COND_PROJ_DIM) -> torch.Tensor:
    """E(w): (B,) -> (B, dim), diffusers' `get_guidance_scale_embedding(w)` (VDM's sinusoid of 1000·w),
    the same float32 operations, so that a pipeline feeding E(w - 1) reproduces the student exactly."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32, as diffusers rounds it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def student_condition(t: torch.Tensor, guidance_scale: torch.Tensor, kind: str = LEGACY_CONDITIONING) -> torch.Tensor:
    """Features of (target time, guidance) for `timestep_cond` (see CONDITIONINGS):
    "sinusoid": (B, 256) [φ(t), φ(62.5·w)]; "diffusers-guidance": (B, 256 + 128) [E(w - 1), φ(t) - φ(0)],
    whose first 256 columns are what StableDiffusionPipeline passes."""
    if kind == LEGACY_CONDITIONING:
        return torch.cat([sinusoid(t), sinusoid(guidance_scale * GUIDANCE_EMBED_SCALE)], dim=-1)
    if kind != DEFAULT_CONDITIONING:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {kind!r}")
    # In float32 (no float64 for TensorRT): exact for w >= 1, so E(w - 1) differs from diffusers' E(float32(w_py - 1))
    # only where float32(w) itself rounded the Python float w.
    guidance = guidance_embedding(guidance_scale.float() - 1.0)
    return torch.cat([guidance, sinusoid(t) - sinusoid(torch.zeros_like(t))], dim=-1)


class GuidanceTimeProjection(nn.Linear):
    """`time_embedding.cond_proj` of a "diffusers-guidance" student: c -> W·E + A_t·τ for c = [E, τ].

    `weight` (C x 256) is diffusers' cond_proj weight; `time_weight` A_t (C x 128) reads the t features
    τ = φ(t) - φ(0), which are 0 at t = 0. Given only E (256 columns, as StableDiffusionPipeline passes
    them) it is diffusers' plain cond_proj. With `guidance_band` F, W's columns for frequencies above F
    take no part (masked in the forward pass: zero-initialised, they get no gradient and stay 0)."""

    def __init__(self, in_features: int, out_features: int, time_features: int = EMBED_DIM,
                 guidance_band: float | None = None):
        super().__init__(in_features, out_features, bias=False)
        self.time_weight = nn.Parameter(torch.zeros(out_features, time_features))
        self.guidance_band = guidance_band
        mask = (guidance_frequencies(in_features) <= guidance_band).float() if guidance_band else None
        self.register_buffer("band_mask", mask, persistent=False)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        n = self.in_features
        weight = self.weight if self.band_mask is None else self.weight * self.band_mask
        out = nn.functional.linear(condition[..., :n], weight)
        if condition.shape[-1] > n:
            out = out + nn.functional.linear(condition[..., n:], self.time_weight)
        return out


def sinusoid_projection(guidance_range: tuple[float, float], n: int = 50_001, ridge: float = 1e-6) -> torch.Tensor:
    """P (128 x 256): the ridge least-squares map with P·E(w - 1) ≈ φ(62.5·w) for w in `guidance_range`."""
    w = torch.linspace(*guidance_range, n, dtype=torch.float64)
    target = sinusoid(w * GUIDANCE_EMBED_SCALE).double()
    feats = guidance_embedding((w - 1.0).float()).double()
    # Ridge-regularised: E's fast columns make the plain least-squares weights huge (float32 noise amplifiers).
    gram = feats.T @ feats + ridge * n * torch.eye(feats.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, feats.T @ target).T  # float64


class SinusoidSpaceProjection(nn.Module):
    """The training form of a "diffusers-guidance" cond_proj that learns where a "sinusoid" one does:
    c = [E, τ] -> A_w·(P·E) + A_t·(τ + φ(0)), with P = sinusoid_projection(range) fixed, so that
    P·E(w - 1) ≈ φ(62.5·w) and τ + φ(0) = φ(t): the features, and so the optimizer's steps, of a "sinusoid"
    student. It takes the same inputs as GuidanceTimeProjection and is saved as one (to_plain_projection:
    W = A_w·P, time_weight = A_t, A_t·φ(0) folded into linear_1's bias), which is exact."""

    def __init__(self, in_features: int, out_features: int, guidance_range: tuple[float, float],
                 time_features: int = EMBED_DIM):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.guidance_range = tuple(float(x) for x in guidance_range)
        self.guidance_weight = nn.Parameter(torch.zeros(out_features, EMBED_DIM))
        self.time_weight = nn.Parameter(torch.zeros(out_features, time_features))
        self.register_buffer("projection", sinusoid_projection(self.guidance_range).float(), persistent=False)
        self.register_buffer("phi0", sinusoid(torch.zeros(1), time_features)[0], persistent=False)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        n = self.in_features
        features = nn.functional.linear(condition[..., :n], self.projection.to(condition.dtype))
        out = nn.functional.linear(features, self.guidance_weight)
        tau = condition[..., n:] if condition.shape[-1] > n else torch.zeros_like(self.phi0)
        return out + nn.functional.linear(tau + self.phi0.to(condition.dtype), self.time_weight)


def to_plain_projection(unet: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """Turn a SinusoidSpaceProjection cond_proj into the GuidanceTimeProjection that computes the same
    function, in place (linear_1's bias takes A_t·φ(0)); returns (the old cond_proj, the old bias) to put
    back with `restore_projection`, or None where there was nothing to convert."""
    emb = unet.time_embedding
    proj = emb.cond_proj
    if not isinstance(proj, SinusoidSpaceProjection):
        return None
    old_bias = emb.linear_1.bias.detach().clone()
    plain = GuidanceTimeProjection(proj.in_features, proj.out_features).to(proj.guidance_weight.device)
    with torch.no_grad():
        plain.weight.copy_((proj.guidance_weight.double() @ proj.projection.double()).to(plain.weight.dtype))
        plain.time_weight.copy_(proj.time_weight)
        shift = emb.linear_1.weight.double() @ (proj.time_weight.double() @ proj.phi0.double())
        emb.linear_1.bias += shift.to(emb.linear_1.bias.dtype)
    emb.cond_proj = plain
    return proj, old_bias


def restore_projection(unet: nn.Module, saved: tuple[nn.Module, torch.Tensor] | None) -> None:
    """Undo to_plain_projection exactly."""
    if saved is None:
        return
    proj, bias = saved
    unet.time_embedding.cond_proj = proj
    with torch.no_grad():
        unet.time_embedding.linear_1.bias.copy_(bias)


def add_condition_projection(unet: nn.Module, kind: str = LEGACY_CONDITIONING,
                             guidance_band: float | None = None,
                             sinusoid_space: tuple[float, float] | None = None) -> nn.Module:
    """Give a teacher UNet the zero-initialised `time_embedding.cond_proj` of diffusers'
    `time_cond_proj_dim` (for `kind`, see CONDITIONINGS; `guidance_band`: see GUIDANCE_BAND;
    `sinusoid_space`: a "diffusers-guidance" one in its SinusoidSpaceProjection training form for this
    guidance range), so the student starts as the teacher at time T for every (t, w)."""
    if kind not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {kind!r}")
    emb = unet.time_embedding
    if sinusoid_space is not None:
        if kind != DEFAULT_CONDITIONING or guidance_band:
            raise ValueError("the sinusoid-space form is for 'diffusers-guidance' students without a guidance band")
        emb.cond_proj = SinusoidSpaceProjection(TIME_COND_PROJ_DIM, emb.linear_1.in_features, sinusoid_space)
        unet.register_to_config(time_cond_proj_dim=TIME_COND_PROJ_DIM)
        return unet
    wanted = GuidanceTimeProjection if kind == DEFAULT_CONDITIONING else nn.Linear
    if type(getattr(emb, "cond_proj", None)) is not wanted or \
            getattr(emb.cond_proj, "guidance_band", None) != guidance_band:
        emb.cond_proj = (GuidanceTimeProjection(TIME_COND_PROJ_DIM, emb.linear_1.in_features,
                                                guidance_band=guidance_band)
                         if kind == DEFAULT_CONDITIONING else
                         nn.Linear(TIME_COND_PROJ_DIM, emb.linear_1.in_features, bias=False))
        unet.register_to_config(time_cond_proj_dim=TIME_COND_PROJ_DIM)
    for p in emb.cond_proj.parameters():
        nn.init.zeros_(p)
    return unet


def unet_guidance_band(unet: nn.Module) -> float | None:
    """The guidance band of a student UNet's condition projection (None: none)."""
    return getattr(unet.time_embedding.cond_proj, "guidance_band", None)


def unet_conditioning(unet: nn.Module) -> str:
    """The conditioning kind of a student UNet, from its condition projection's type."""
    return DEFAULT_CONDITIONING if isinstance(unet.time_embedding.cond_proj,
                                              (GuidanceTimeProjection, SinusoidSpaceProjection)) \
        else LEGACY_CONDITIONING


@dataclass(frozen=True)
class StudentSpec:
    """How a student reads its UNet; stored in boot.json."""

    prediction_type: str
    input_timestep: int | None  # the UNet's own timestep input: the teacher's T, or None for the target t
    parameterization: str = DEFAULT_PARAMETERIZATION
    conditioning: str = LEGACY_CONDITIONING


class Student(nn.Module):
    """g_θ(ε, t, c, w): predicted signal y_t of the teacher's DDIM trajectory from noise ε.

    Output parameterization ("teacher-at-T", the default): the UNet always sees its pretraining
    input at time T (pure noise x_T = ε, timestep T); the target time t and guidance w arrive only
    through the zero-initialised condition projection; the output is read as the teacher reads it
    at T. Hence g(ε, t, c, w) = f(ε, T, c) at initialisation, for every t and w (for an epsilon
    teacher the reading divides by α_T: see the module docstring and `update_scale`). The
    alternatives of PARAMETERIZATIONS change one of those choices each, for ablations.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 parameterization: str = DEFAULT_PARAMETERIZATION, time_ids: torch.Tensor | None = None):
        super().__init__()
        if prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise ValueError("an epsilon-prediction teacher on a zero-terminal-SNR schedule has no "
                             "x0 at T; use a v- or sample-prediction teacher")
        parameterization = parameterization_name(parameterization)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.parameterization = parameterization
        self.register_buffer("time_ids", time_ids, persistent=False)  # SDXL's (6,) add_time_ids, else None

    @property
    def conditioning(self) -> str:
        """The kind its condition projection is now (read from the UNet at every call, so that a UNet converted in
        place by boot.conditioning.convert_conditioning, is never fed the features of the kind it was before)."""
        return unet_conditioning(self.unet)

    @property
    def update_scale(self) -> float:
        """κ of `update_scale` for this student (1 unless teacher-at-T-scaled-lr with an epsilon teacher)."""
        return update_scale(self.schedule, self.prediction_type, self.parameterization)

    @property
    def spec(self) -> StudentSpec:
        return StudentSpec(self.prediction_type, unet_input_timestep(self.parameterization, self.schedule.T),
                           self.parameterization, self.conditioning)

    def forward(self, noise: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance_scale: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        T = torch.full((noise.shape[0],), self.schedule.T, device=noise.device, dtype=torch.long)
        cond = student_condition(t, guidance_scale, self.conditioning).to(noise.dtype)
        unet_time = t if self.parameterization == "unet-at-t" else T
        # fp32 before the x0 read: under autocast the UNet returns bf16/fp16, and the bootstrap residual
        # (a small difference of two passes, weighted by up to 1/δ² ≈ 250²) must not inherit that rounding.
        out = self.unet(noise, unet_time, encoder_hidden_states, timestep_cond=cond,
                        **unet_kwargs(pooled, self.time_ids)).sample.float()
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
