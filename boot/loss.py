"""The BOOT objective (Gu et al. 2023, arXiv 2306.05544; docs/method.md "The signal-ODE step", "The losses").

Along the teacher's DDIM trajectory from x_T = ε, the signal y_t = (x_t − σ_t·ε)/α_t obeys an ODE whose
one-step discretisation from t to s < t is

    y_s ≈ y_t + δ(t, s)·(f_w(α_t·y_t + σ_t·ε, t, c) − y_t),   δ(t, s) = 1 − σ_s·α_t / (α_s·σ_t)

The student g_θ(ε, t, c, w) learns y_t for every t from noise alone, no data: its prediction at s is
bootstrapped from its own prediction at t through that step, and the chain is anchored at T, where the
student must equal the teacher's x0-prediction from pure noise.

    bootstrap_target     stopgrad(tgt): the step from the target student's ŷ_t, as n teacher DDIM steps
    BootLoss             L = L_BS + β·L_BC, the training objective
    FinalHopRegression   L_BS of final hops to s = 0 against stored targets (the refinement stage)

Each loss is a callable that owns only its hyperparameters and returns per-sample losses; the training
loop (distill/loop.py) draws (ε, c, w, t), reduces and steps. Notation as in boot.method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from boot.method import NoiseSchedule, Student, TeacherX0, bcast
from boot.sdxl import pooled_args


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
        x_u = bcast(sched.alpha[u], y) * y + bcast(sched.sigma[u], y) * noise[i]
        f_u = teacher(x_u, u, cond[i], pick(uncond, i), w[i], *pooled_args(pick(pooled, i)),
                      *pooled_args(pick(uncond_pooled, i)))
        tgt[i] = y + bcast(sched.delta(u, v), y) * (f_u - y)
    return tgt


@dataclass
class BootLoss:
    """L = L_BS + β·L_BC (+ L_A on anchor rows) (docs/method.md), per sample.

        ŷ_t  = stopgrad(g_target(ε, t, c))
        tgt  = ŷ_t + δ·(f_w(α_t·ŷ_t + σ_t·ε, t, c) − ŷ_t)
        L_BS = ‖g(ε, s, c) − stopgrad(tgt)‖² / δ²,   δ = δ(t, s)   (c_p / δ^p with delta_power p ≠ 2)
        L_BC = ‖g(ε, T, c) − stopgrad(f_w(ε, T, c))‖²
        L_A  = λ_A·‖g(ε, 0, c) − stopgrad(DDIM_K_A(ε, c, w))‖²   (anchor rows only)

    With solver_steps K > 1 the target is the same signal-ODE step taken as K teacher DDIM steps
    t = u_0 > u_1 > ... > u_K = s (evenly spaced): y ← y + δ(u_k, u_k+1)·(f_w(α_u·y + σ_u·ε, u_k) − y),
    starting from ŷ_t. K = 1 is the paper's single step. A larger Δ then needs fewer bootstrap
    hops from T to 0 (less accumulated student error) without a coarser teacher step.

    With final_hop F > 0 every t <= F hops straight to s = 0, its target taken as ceil(F·K/Δ)
    teacher DDIM steps (none longer than Δ/K): the image g(ε, 0) is then trained against the
    teacher finishing its own sampler from the student's ŷ_t, rather than through the last
    F/Δ bootstrap hops, where a student's errors pile up most (docs/ablations.md). The caller
    draws such t from (F − Δ, F], whose ŷ_t the ordinary hops from (F, F + Δ] train.

    With boundary_fraction f < 1, L_BC is computed on the first m = ceil(f·b) samples of the (randomly
    drawn) batch only and weighted b/m there, so the batch mean of the loss keeps its expectation while
    the teacher's call at T and the student's T branch cost m rows instead of b. A caller holding a slice
    of a larger batch passes those weights instead (`boundary`, per sample: 0 where L_BC is not computed;
    boundary_weights gives them for a whole batch), so every process count picks the same samples.

    With delta_power p ≠ 2 the hop at t is weighted c_p/δ^p instead of the paper's 1/δ², where c_p makes the
    mean weight over t = 1..T the same as 1/δ²'s: the hops share the same total weight against L_BC, spread
    differently over t. 1/δ² is about 2 on the last hop (t <= Δ to s = 0) and up to about 220 in the middle
    of the trajectory (the shapes teacher, Δ = 20), so under a gradient clip that is always active the last
    hop gets a small share of every step; p = 1 or 0 moves weight towards it. The quick preset takes p = 1
    (over five seeds +2.6 points, +5.2 on the held-out compositions); p = 0 and 3 lost (docs/ablations.md).

    With huber_c c > 0 each sample's L_BS (its squared error already divided by δ^p/c_p) and L_BC are the
    pseudo-Huber sqrt(e + c²) − c of their squared error e instead of e itself: quadratic below e ≈ c², the
    error's norm above, so a sample's pull on the step grows with its error only up to about c. A batch's
    hop errors are heavy-tailed (a trained quick student's: median e 0.02-0.07, the largest of 16 0.4-3.5,
    so one or two samples make most of the mean), and under a gradient clip that is always active those
    few samples set the direction of every step; the pseudo-Huber loss of improved consistency training
    (Song & Dhariwal 2023) takes that dominance away. On the quick preset it traded two-object captions for
    single ones at the same accuracy overall, so it is off by default (docs/ablations.md).

    Anchor rows (`anchor`, per-sample weights λ_A, 0 elsewhere; distill.batches.anchor_weights) also
    train the one-step image directly: g(ε, 0, c, w) against the teacher's own anchor_steps-step DDIM
    sample from the same noise (bootstrap_target from T to 0), so the image is pulled towards the
    teacher's ODE endpoint on a few rows of every batch rather than only through the chain of hops
    down to it (data-free: the targets are the teacher's samples; docs/ablations.md).
    """

    delta_steps: int = 20  # Δ
    beta: float = 1.0  # β
    solver_steps: int = 1  # K: teacher DDIM steps inside one bootstrap target
    final_hop: int = 0  # F: t <= F hops straight to s = 0 (0: off, the paper's hops everywhere)
    boundary_fraction: float = 1.0  # share of the batch whose L_BC is computed (the first ceil(f·b) samples)
    anchor_steps: int = 8  # K_A: teacher DDIM steps from T to 0 in an anchor row's target
    min_delta: float = 1e-3  # floor on δ in the 1/δ² weight
    delta_power: float = 2.0  # p: the hop at t weighted c_p/δ^p (2: the paper's 1/δ², c_2 = 1)
    huber_c: float = 0.0  # c > 0: each sample's L_BS and L_BC as sqrt(e + c²) − c of its squared error e (0: e)
    guidance_power: float = 0.0  # q != 0: each sample's L_BS and L_BC weighted c_q/w^q (0: unweighted)
    guidance_range: tuple[float, float] = (1.0, 6.0)  # the w drawn, uniform on it: sets c_q

    def guidance_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Per-sample c_q/w^q for guidance scales w, c_q = 1/E[w^-q] over w uniform on guidance_range, so the
        mean weight is 1 (all 1 at q = 0)."""
        q, (a, b) = self.guidance_power, self.guidance_range
        if q == 0:
            return torch.ones_like(w)
        if b - a < 1e-9:
            mean = a ** -q
        elif abs(q - 1) < 1e-9:
            mean = math.log(b / a) / (b - a)
        else:
            mean = (b ** (1 - q) - a ** (1 - q)) / ((1 - q) * (b - a))
        return w.pow(-q) / mean

    def hop_divisor(self, schedule: NoiseSchedule, d: torch.Tensor) -> torch.Tensor:
        """δ^p/c_p for hops with step δ = d, the squared error's divisor (δ² at p = 2, the paper's),
        c_p from the ordinary hops t = 1..T of `schedule`."""
        d = d.clamp_min(self.min_delta)
        if self.delta_power == 2:
            return d.pow(2)
        t = torch.arange(1, schedule.T + 1, device=schedule.alpha.device)
        every = schedule.delta(t, (t - self.delta_steps).clamp_min(0)).double().clamp_min(self.min_delta)
        c = every.pow(-2).mean() / every.pow(-self.delta_power).mean()
        return d.pow(self.delta_power) / c.to(d.dtype)

    def robust(self, e: torch.Tensor) -> torch.Tensor:
        """Per-sample squared errors e as the loss: e itself, or with huber_c c > 0 sqrt(e + c²) − c."""
        c = self.huber_c
        return e if c <= 0 else (e + c * c).sqrt() - c

    @property
    def final_steps(self) -> int:
        """Teacher DDIM steps in a final hop's target: ceil(F·K/Δ), so none is longer than Δ/K."""
        return -(-self.final_hop * self.solver_steps // self.delta_steps)

    def __call__(self, student: Student, target: Student, teacher: TeacherX0, noise: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None, w: torch.Tensor,
                 t: torch.Tensor, pooled: torch.Tensor | None = None,
                 uncond_pooled: torch.Tensor | None = None,
                 boundary: torch.Tensor | None = None,
                 anchor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sched = teacher.schedule
        # Per sample: the target time s and the teacher steps n of its target (K, or ceil(F·K/Δ) on a
        # final hop; with F = 0 there is none, since t >= 1).
        final = t <= self.final_hop
        s = torch.where(final, 0, (t - self.delta_steps).clamp_min(0))
        n = torch.where(final, self.final_steps, torch.full_like(t, self.solver_steps))
        T = torch.full_like(t, sched.T)
        dims = tuple(range(1, noise.ndim))
        # Rows of the one batched student call (the only graph with gradients): every sample at s, then the
        # boundary rows at T, then the anchor rows at 0.
        weight = ((boundary_weights(len(t), self.boundary_fraction) if boundary is None else boundary)
                  if self.beta else torch.zeros(len(t))).to(t.device)
        anchor = torch.zeros(len(t), device=t.device) if anchor is None else anchor.to(t.device)
        i, a = weight.nonzero().squeeze(1), anchor.nonzero().squeeze(1)
        sub = lambda x, rows: None if x is None else x[rows]  # noqa: E731
        with torch.no_grad():
            # 1. Bootstrap target: from the (stop-gradient) target student's ŷ_t, n teacher DDIM steps to s.
            tgt = bootstrap_target(target, teacher, noise, cond, uncond, w, t, s, n, pooled, uncond_pooled)
            d = sched.delta(t, s)
            # 2. Boundary target: the teacher at T on pure noise, on the samples whose L_BC weight is not 0.
            f_T = teacher(noise[i], T[i], cond[i], sub(uncond, i), w[i], *pooled_args(sub(pooled, i)),
                          *pooled_args(sub(uncond_pooled, i))) if len(i) else None
            # 3. Anchor target: the teacher's own K_A-step DDIM from T to 0 (the target student's ŷ_T only sets
            #    where it starts, α_T·ŷ_T + σ_T·ε, which is ε itself for a zero-terminal-SNR teacher).
            y_A = bootstrap_target(target, teacher, noise[a], cond[a], sub(uncond, a), w[a], T[a],
                                   torch.zeros_like(T[a]), torch.full_like(T[a], self.anchor_steps),
                                   sub(pooled, a), sub(uncond_pooled, a)) if len(a) else None
        rows = torch.cat([torch.arange(len(t), device=t.device), i, a])
        times = torch.cat([s, T[i], torch.zeros_like(T[a])])
        pred = student(noise[rows], times, cond[rows], w[rows], *pooled_args(sub(pooled, rows)))
        g_s, g_T, g_0 = pred[:len(t)], pred[len(t):len(t) + len(i)], pred[len(t) + len(i):]
        l_bs = self.robust((g_s - tgt).pow(2).mean(dims) / self.hop_divisor(sched, d))
        l_bc, l_a = torch.zeros_like(l_bs), torch.zeros_like(l_bs)
        if len(i):
            l_bc[i] = self.robust((g_T - f_T).pow(2).mean(dims)) * weight[i].to(l_bs.dtype)
        if len(a):
            l_a[a] = (g_0 - y_A).pow(2).mean(dims) * anchor[a].to(l_bs.dtype)
        if self.guidance_power:
            scale = self.guidance_weight(w.to(l_bs.dtype))
            l_bs, l_bc = l_bs * scale, l_bc * scale
        return {"loss": l_bs + self.beta * l_bc + l_a, "bootstrap": l_bs.detach(), "boundary": l_bc.detach(),
                "anchor": l_a.detach()}


def boundary_weights(n: int, fraction: float) -> torch.Tensor:
    """Per-sample weights of L_BC for a batch of n with BootLoss(boundary_fraction): n/m on the first
    m = ceil(fraction·n) samples, 0 on the rest (all 1 at fraction 1)."""
    m = min(n, max(1, math.ceil(fraction * n)))
    return torch.cat([torch.full((m,), n / m), torch.zeros(n - m)])


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
        x0 = g_0 = student(noise, zero, cond, w, *pooled_args(pooled))
        if self.decode is not None:
            with torch.no_grad():
                y = self.decode(y)
            g_0 = self.decode(g_0)
        d = schedule.delta(t, zero)
        l_bs = (g_0 - y).pow(2).mean(tuple(range(1, g_0.ndim))) / d.clamp_min(self.min_delta).pow(2)
        # "x0": the one-step image in latent space, with its graph (a distribution-matching term reuses it)
        return {"loss": l_bs, "bootstrap": l_bs.detach(), "boundary": torch.zeros_like(l_bs), "x0": x0}
