"""Distribution matching of the one-step output (DMD, Yin et al. 2024; DMD2, Yin et al. 2024), data-free.

BOOT trains the student along the teacher's trajectory; this term matches the *distribution* of its one-step
image x̂ = g_θ(ε, 0, c, w) to the teacher's, without data (docs/method.md, "Distribution matching"):

    t ~ U{t_min..t_max},  n ~ N(0, I),  x_t = α_t·x̂ + σ_t·n                                     (DMD eq. 6)
    real = f_w(x_t, t, c)        the teacher's x0-prediction with CFG at the student's w, no grad
    fake = f_φ(x_t, t, c)        an online "fake" x0-model of the student's own outputs, no grad
    ∇_x̂ KL ≈ grad = (fake − real) / mean_CHW |x̂ − real|                                          (DMD eq. 7-8)
    L_DM = ½·‖x̂ − stopgrad(x̂ − grad)‖²  (mean over C, H, W),  so ∂L_DM/∂x̂ = grad / (C·H·W)

The fake model starts as a trainable copy of the teacher's UNet, read as the teacher reads it (boot.method.to_x0),
conditional only (f_φ = the teacher's f_1 at the start), or with `guided` through CFG of its own conditional and
unconditional branches at the sample's w (f_φ = the teacher's f_w = real at the start, so the term starts at 0 for a
student that already matches the guided teacher, instead of pushing x̂ along (w − 1)·(f_c − f_u)), and follows the
student (two time-scale update, DMD2 §4.2): `updates` AdamW steps per student
step, each on the batch's detached x̂ with fresh t and n:

    L_fake = ‖f_φ(α_t·sg(x̂) + σ_t·n, t, c) − sg(x̂)‖²  (mean over C, H, W)                        (DMD eq. 9)

Each callable here owns only its hyperparameters; the training loop (distill/loop.py) owns the networks,
the optimizers and the random draws (seeded by (seed, step), so a resumed run draws what an uninterrupted one does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from boot.method import NoiseSchedule, TeacherX0, bcast, guided_x0


class FakeX0(nn.Module):
    """f_φ(x_t, t, c, w): a trainable x0-predictor of the student's output distribution.

    Built from the teacher (`from_teacher`): a float32 copy of its UNet, read with the teacher's prediction type,
    so that f_φ = the teacher's conditional x0-prediction at initialisation, or with `guided` its CFG
    prediction at w (two branches per call)."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 time_ids: torch.Tensor | None = None, guided: bool = False):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.guided = guided
        self.register_buffer("time_ids", time_ids, persistent=False)

    @classmethod
    def from_teacher(cls, teacher: TeacherX0, guided: bool = False) -> FakeX0:
        unet = copy.deepcopy(teacher.unet).float().train().requires_grad_(True)
        return cls(unet, teacher.schedule, teacher.prediction_type, teacher.time_ids, guided)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None = None,
                uncond: torch.Tensor | None = None, w: torch.Tensor | None = None,
                uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
        if not self.guided:
            return guided_x0(self, x_t, t, cond, None, 1.0, pooled)
        if uncond is None or w is None:
            raise ValueError("a guided fake model needs the unconditional states and w")
        return guided_x0(self, x_t, t, cond, uncond, w, pooled, uncond_pooled)


def draw_timesteps(t_min: float, t_max: float, T: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """(b,) integer t ~ U{round(t_min·T)..round(t_max·T)} (t_min, t_max as fractions of T, DMD's 0.02..0.98)."""
    lo, hi = max(1, round(t_min * T)), max(1, round(t_max * T))
    return torch.randint(lo, hi + 1, (b,), generator=gen)


def diffuse(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x_t = α_t·x + σ_t·n."""
    return bcast(schedule.alpha[t], x) * x + bcast(schedule.sigma[t], x) * n


@dataclass
class DistributionMatchingLoss:
    """L_DM of the module docstring, per sample: the DMD gradient (fake − real)/mean_CHW|x̂ − real| applied to x̂
    through ½‖x̂ − stopgrad(x̂ − grad)‖² (mean over C, H, W).

    `min_norm` floors the per-sample normaliser (DMD's mean |x̂ − real|), so a sample the teacher already
    reproduces exactly gives a bounded gradient."""

    min_norm: float = 1e-6

    @staticmethod
    @torch.no_grad()
    def gradient(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, min_norm: float = 1e-6) -> torch.Tensor:
        """grad = (fake − real) / mean_CHW |x − real|, per sample (DMD eq. 8)."""
        dims = tuple(range(1, x.ndim))
        norm = (x - real).abs().mean(dims, keepdim=True).clamp_min(min_norm)
        return torch.nan_to_num((fake - real) / norm)

    def __call__(self, x: torch.Tensor, teacher: TeacherX0, fake: FakeX0, cond: torch.Tensor,
                 uncond: torch.Tensor | None, w: torch.Tensor, t: torch.Tensor, n: torch.Tensor,
                 pooled: torch.Tensor | None = None,
                 uncond_pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x_t = diffuse(teacher.schedule, x.detach(), t, n)
            real = teacher(x_t, t, cond, uncond, w, pooled, uncond_pooled)
            fake_x0 = fake(x_t, t, cond, pooled, uncond, w, uncond_pooled)
            grad = self.gradient(x.detach(), real, fake_x0, self.min_norm)
        dims = tuple(range(1, x.ndim))
        loss = 0.5 * (x - (x.detach() - grad)).pow(2).mean(dims)
        return {"loss": loss, "grad_norm": grad.pow(2).mean(dims).sqrt()}


@dataclass
class FakeScoreLoss:
    """L_fake of the module docstring, per sample: the fake model's x0 denoising loss on the student's detached
    samples, L = ‖f_φ(α_t·sg(x̂) + σ_t·n, t, c) − sg(x̂)‖² (mean over C, H, W)."""

    def __call__(self, fake: FakeX0, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, n: torch.Tensor,
                 pooled: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None, uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
        x = x.detach()
        pred = fake(diffuse(fake.schedule, x, t, n), t, cond, pooled, uncond, w, uncond_pooled)
        return (pred - x).pow(2).mean(tuple(range(1, x.ndim)))


@dataclass
class FakeScoreUpdate:
    """`updates` AdamW steps of the fake model on one batch of student samples (DMD2's two time-scale update),
    each with its own t ~ U{t_min..t_max} and n from `gen`; returns the mean L_fake before each step."""

    updates: int = 2
    t_min: float = 0.02
    t_max: float = 0.98
    grad_clip: float = 1.0

    def __call__(self, fake: FakeX0, opt: torch.optim.Optimizer, x: torch.Tensor, cond: torch.Tensor,
                 gen: torch.Generator, pooled: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None, uncond_pooled: torch.Tensor | None = None) -> float:
        loss_fn, losses = FakeScoreLoss(), []
        x = x.detach()
        for _ in range(self.updates):
            t = draw_timesteps(self.t_min, self.t_max, fake.schedule.T, x.shape[0], gen).to(x.device)
            n = torch.randn(x.shape, generator=gen).to(x.device)
            loss = loss_fn(fake, x, cond, t, n, pooled, uncond, w, uncond_pooled).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(fake.unet.parameters(), self.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        return sum(losses) / max(len(losses), 1)
