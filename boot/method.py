"""BOOT (Gu et al., arXiv 2306.05544): teacher x0-wrapper, signal-space student, bootstrapping loss.

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
so the "preconditioned" parameterization keeps the reading and scales each optimizer step on
the UNet by κ = α_T/σ_T instead (`update_scale`). With Adam and no weight decay that is training
θ = θ_0 + κ·φ in φ: an update then moves the student's signal as far as a v-prediction
student's. The losses stay in latent-x0 units, the same units for every prediction type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from boot.sdxl import pooled_args, unet_kwargs

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How the student reads its UNet (Student; docs/ablations.md "Output parameterization"):
#   teacher-at-T  UNet(ε, T), read as the teacher reads its output at T (the default, what ships)
#   direct        UNet(ε, T), the output taken as the signal itself
#   unet-at-t     UNet(ε, t), the UNet's own timestep input set to the target time t, read as at T
#   preconditioned  read as teacher-at-T; its optimizer steps scaled by κ = α_T/σ_T where the teacher
#                 predicts epsilon, else exactly teacher-at-T (docs/byo-teacher.md, "Epsilon-prediction teachers")
PARAMETERIZATIONS = ("teacher-at-T", "direct", "unet-at-t", "preconditioned")
DEFAULT_PARAMETERIZATION = PARAMETERIZATIONS[0]


def recorded_parameterization(meta: dict) -> str:
    """A student's parameterization from its boot.json (absent in folders written before it was recorded)."""
    return meta.get("parameterization", DEFAULT_PARAMETERIZATION)


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
# A "diffusers-guidance" UNet's t weights A_t, beside its diffusers weights in unet/ (diffusers never reads them).
TIME_WEIGHTS = "boot_time_condition.safetensors"
# unet/config.json key naming the conditioning kind the weights were saved in (diffusers ignores "_" keys), so a
# folder whose boot.json records another kind is refused at load (load_student_unet).
SAVED_CONDITIONING_KEY = "_boot_conditioning"
# E(w - 1) holds sinusoids of w from 0.1 to 1000 rad per unit of w; the "sinusoid" features stop at 62.5
# (GUIDANCE_EMBED_SCALE). A band-limited student trains only E's columns up to this frequency and keeps
# the faster ones at exactly 0, so diffusers' plain cond_proj still computes it.
GUIDANCE_BAND = GUIDANCE_EMBED_SCALE


def recorded_conditioning(meta: dict) -> str:
    """A student's conditioning kind from its boot.json (folders without a "kind" use "sinusoid")."""
    return (meta.get("conditioning") or {}).get("kind", LEGACY_CONDITIONING)


def conditioning_record(kind: str, guidance_band: float | None = None) -> dict:
    """boot.json "conditioning" of a student of this kind (`guidance_band`: see GUIDANCE_BAND)."""
    if kind == LEGACY_CONDITIONING:
        return {"kind": kind, "time_cond_proj_dim": TIME_COND_PROJ_DIM, "embed_dim": EMBED_DIM,
                "guidance_embed_scale": GUIDANCE_EMBED_SCALE}
    return {"kind": kind, "time_cond_proj_dim": TIME_COND_PROJ_DIM, "guidance": "get_guidance_scale_embedding(w - 1)",
            "time": "sinusoid(t) - sinusoid(0)", "embed_dim": EMBED_DIM, "time_weights": f"unet/{TIME_WEIGHTS}",
            **({"guidance_band": guidance_band} if guidance_band else {})}


def recorded_guidance_band(meta: dict) -> float | None:
    """The guidance band a student was trained with (None: all of E's columns)."""
    return (meta.get("conditioning") or {}).get("guidance_band")


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


def update_scale(schedule: NoiseSchedule, prediction_type: str, parameterization: str) -> float:
    """κ = α_T/σ_T for a "preconditioned" student of an epsilon teacher, else 1: training scales
    each optimizer step on the UNet by κ (module docstring), so that κ·∂g/∂out = −1, the slope
    of a v-prediction student's reading at T (−σ_T ≈ −1)."""
    if parameterization != "preconditioned" or prediction_type != "epsilon":
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
        # The frozen UNet may be held in half precision (distill.run --teacher-dtype): inputs go in at its
        # dtype, its output comes back in fp32 before the x0 read (an epsilon read at T multiplies
        # rounding by σ_T/α_T ≈ 14.6 on SD's schedule).
        dtype = next(self.unet.parameters(), x_t).dtype  # (a parameterless stand-in runs at x_t's)
        if uncond is None:
            out = self.unet(x_t.to(dtype), t, cond.to(dtype),
                            **unet_kwargs(pooled, self.time_ids, dtype)).sample.float()
            return to_x0(out, x_t, t, self.schedule, self.prediction_type)
        # One batched call for the conditional and unconditional branches.
        both = None if pooled is None else torch.cat([pooled, uncond_pooled])
        out = self.unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), torch.cat([cond, uncond]).to(dtype),
                        **unet_kwargs(both, self.time_ids, dtype)).sample.float()
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


def save_student_unet(unet: nn.Module, folder: str | Path) -> None:
    """unet.save_pretrained(folder) in diffusers' own form (a plain cond_proj), plus TIME_WEIGHTS beside it
    for a "diffusers-guidance" UNet, so that diffusers loads unet/ with no unknown weights."""
    saved = to_plain_projection(unet)  # a training form is saved as the plain one it equals
    try:
        _save_plain_student_unet(unet, folder)
    finally:
        restore_projection(unet, saved)


def _save_plain_student_unet(unet: nn.Module, folder: str | Path) -> None:
    from safetensors.torch import save_file

    emb = unet.time_embedding
    proj = emb.cond_proj
    unet.register_to_config(**{SAVED_CONDITIONING_KEY: unet_conditioning(unet)})
    if not isinstance(proj, GuidanceTimeProjection):
        unet.save_pretrained(folder, safe_serialization=True)
        return
    plain = nn.Linear(proj.in_features, proj.out_features, bias=False, device="meta")
    plain.weight = proj.weight  # the same Parameter: nothing is copied
    emb.cond_proj = plain
    try:
        unet.save_pretrained(folder, safe_serialization=True)
    finally:
        emb.cond_proj = proj
    save_file({"time_embedding.cond_proj.time_weight": proj.time_weight.detach().float().cpu().contiguous()},
              str(Path(folder) / TIME_WEIGHTS))


def check_student_unet(folder: str | Path, kind: str, guidance_band: float | None = None) -> None:
    """ValueError, one line naming the mismatch, unless the UNet folder `folder` holds weights of the conditioning
    `kind` (and `guidance_band`) its boot.json records: the time_cond_proj_dim of a student, the kind its
    config.json says they were saved in (SAVED_CONDITIONING_KEY, where present), and TIME_WEIGHTS beside them
    exactly when the kind is "diffusers-guidance". From the config files alone, before any weight is read."""
    import json

    folder = Path(folder)
    said = f"boot.json records a {kind!r} conditioning, but {folder}"
    if kind not in CONDITIONINGS:
        raise ValueError(f"boot.json conditioning kind {kind!r} is not one of {CONDITIONINGS}")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config and config.get("time_cond_proj_dim") != TIME_COND_PROJ_DIM:
        raise ValueError(f"{said}/config.json has time_cond_proj_dim {config.get('time_cond_proj_dim')} (a student's "
                         f"is {TIME_COND_PROJ_DIM}): not a BOOT student's UNet")
    saved_as = config.get(SAVED_CONDITIONING_KEY)
    if saved_as is not None and saved_as != kind:
        raise ValueError(f"{said} holds weights saved as a {saved_as!r} student ({SAVED_CONDITIONING_KEY} in its "
                         "config.json): the record does not match the weights")
    has_time_weights = (folder / TIME_WEIGHTS).is_file()
    if kind == DEFAULT_CONDITIONING and not has_time_weights:
        raise ValueError(f"{said} lacks {TIME_WEIGHTS}, the t weights of that kind (weights of a "
                         f"{LEGACY_CONDITIONING!r} student, or a conversion left unfinished): the record does not "
                         "match the weights")
    if kind == LEGACY_CONDITIONING and has_time_weights:
        raise ValueError(f"{said} holds {TIME_WEIGHTS}, the t weights of a {DEFAULT_CONDITIONING!r} student: "
                         "the record does not match the weights")
    if guidance_band and kind != DEFAULT_CONDITIONING:
        raise ValueError(f"boot.json records a guidance band {guidance_band:g} for a {kind!r} conditioning, "
                         f"which has none (only {DEFAULT_CONDITIONING!r} students are band-limited)")


def load_student_unet(folder: str | Path, kind: str, guidance_band: float | None = None) -> nn.Module:
    """A student's UNet from `folder` (its unet/ directory) as save_student_unet wrote it, ready for Student.
    Weights that are not of the conditioning `kind` (and `guidance_band`) boot.json records are refused with a
    ValueError naming the mismatch (check_student_unet; a band-limited student's guidance weights above its band
    must be 0), rather than loaded and run with the wrong features."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    check_student_unet(folder, kind, guidance_band)
    unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    if kind == LEGACY_CONDITIONING:
        return unet
    weight = unet.time_embedding.cond_proj.weight.detach().clone()
    if guidance_band:
        fast = guidance_frequencies(weight.shape[1]) > guidance_band
        if bool(weight[:, fast].ne(0).any()):
            raise ValueError(f"boot.json records a guidance band of {guidance_band:g} rad per unit of w, but the "
                             f"guidance weights in {folder} use E(w - 1)'s columns above it: the record does not match "
                             "the weights")
    add_condition_projection(unet, kind)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(weight)
        unet.time_embedding.cond_proj.time_weight.copy_(
            load_file(str(folder / TIME_WEIGHTS))["time_embedding.cond_proj.time_weight"])
    return unet


def convert_conditioning(unet: nn.Module, guidance_range: tuple[float, float], n: int = 50_001,
                         ridge: float = 1e-6) -> dict:
    """Turn a "sinusoid" student UNet into a "diffusers-guidance" one, in place; return the fit's residual.

    linear_1(s + A_t·φ(t) + A_w·φ(62.5·w)) = linear_1(s + A_t·(φ(t) - φ(0)) + B·E(w - 1)) + error, with
    linear_1's bias += W_1·A_t·φ(0) (exact at every t) and B the least-squares fit of A_w·φ(62.5·w) by
    B·E(w - 1) on n guidance scales spanning `guidance_range` (approximate: E has other frequencies)."""
    emb = unet.time_embedding
    if unet_conditioning(unet) != LEGACY_CONDITIONING or emb.cond_proj.in_features != TIME_COND_PROJ_DIM:
        raise ValueError("only a 'sinusoid' student UNet can be converted")
    if emb.linear_1.bias is None:
        raise ValueError("the time embedding's linear_1 has no bias to fold the constant t = 0 term into")
    a = emb.cond_proj.weight.detach().double()
    a_t, a_w = a[:, :EMBED_DIM], a[:, EMBED_DIM:]
    b = a_w @ sinusoid_projection(guidance_range, n, ridge)  # the fit is linear in the target: A_w·P
    w = torch.linspace(*guidance_range, n, dtype=torch.float64)
    target = sinusoid(w * GUIDANCE_EMBED_SCALE).double() @ a_w.T
    residual = guidance_embedding((w - 1.0).float()).double() @ b.T - target
    phi0 = sinusoid(torch.zeros(1))[0].double()
    with torch.no_grad():
        emb.linear_1.bias += (emb.linear_1.weight.double() @ (a_t @ phi0)).to(emb.linear_1.bias.dtype)
        add_condition_projection(unet, DEFAULT_CONDITIONING)
        emb.cond_proj.weight.copy_(b)
        emb.cond_proj.time_weight.copy_(a_t)
    return {"guidance_range": list(guidance_range), "points": n, "ridge": ridge,
            "relative_residual": float(residual.norm() / target.norm()),
            "max_abs_residual": float(residual.abs().max())}


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
        place, boot.convert_conditioning, is never fed the features of the kind it was before)."""
        return unet_conditioning(self.unet)

    @property
    def update_scale(self) -> float:
        """κ of `update_scale` for this student (1 unless preconditioned with an epsilon teacher)."""
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
    """L = L_BS + β·L_BC (docs/method.md), per sample.

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
        dims = tuple(range(1, noise.ndim))
        if self.beta == 0:  # no boundary term: neither its teacher call nor the student's T branch is computed
            g_s = student(noise, s, cond, w, *pooled_args(pooled))
            l_bs = (g_s - tgt).pow(2).mean(dims) / d.clamp_min(self.min_delta).pow(2)
            return {"loss": l_bs, "bootstrap": l_bs.detach(), "boundary": torch.zeros_like(l_bs)}
        # 2. Boundary target: the teacher at T on pure noise.
        with torch.no_grad():
            f_T = teacher(noise, T, cond, uncond, w, *pooled_args(pooled), *pooled_args(uncond_pooled))
        # 3. Online student at s and at T (one batched call); the only graph with gradients.
        pred = student(torch.cat([noise, noise]), torch.cat([s, T]), torch.cat([cond, cond]),
                       torch.cat([w, w]), *pooled_args(None if pooled is None else torch.cat([pooled, pooled])))
        g_s, g_T = pred.chunk(2)
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
