"""Each step's global batch, drawn from a generator seeded by (seed, step): a resumed run sees the
batches an uninterrupted one would, and every rank draws the same batch and keeps its slice; the
learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from boot.loss import boundary_weights
from distill.config import RunConfig


@dataclass
class Batch:
    prompt: torch.Tensor  # (B,) index into the prompt list
    noise: torch.Tensor  # (B, C, h, w) ε, the trajectory's starting noise
    t: torch.Tensor  # (B,) long in [1, T]: uniform (on [t_floor, T] with --t-sweep), or ceil(T·u^γ) (--t-power),
    #                  or see draw_batch (--final-hop); with --stratify one from each B-th of the range
    w: torch.Tensor  # (B,) guidance scale
    boundary: torch.Tensor  # (B,) weight of L_BC, 0 where it is not computed (boot.loss.boundary_weights)
    anchor: torch.Tensor  # (B,) weight of the anchor term L_A, 0 where it is not computed (anchor_weights)

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's contiguous slice of the global batch."""
        n = self.t.shape[0] // world
        return Batch(*(x[rank * n:(rank + 1) * n] for x in dataclasses.astuple(self)))


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step): resume- and world-size-invariant draws. `stream` > 0 gives
    an independent one of the same step (the DMD term's draws: stream 1), leaving stream 0's batch unchanged."""
    state = np.random.SeedSequence([seed, step, *([stream] if stream else [])]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_batch(cfg: RunConfig, step: int, n_prompts: int, latent_shape: tuple[int, ...], T: int) -> Batch:
    """The global batch of `step` (identical on every rank)."""
    gen = step_generator(cfg.seed, step)
    b = cfg.batch_size
    prompt = torch.randint(0, n_prompts, (b,), generator=gen)
    noise = torch.randn((b, *latent_shape), generator=gen)
    if cfg.stratify:  # one t and one w from each of b equal slices of their ranges, paired at random
        lo = t_floor(cfg, step, T)
        u_t, u_w = stratified(b, gen), stratified(b, gen)
        t = ((lo + ((T - lo + 1) * u_t).floor().long()) if cfg.t_power == 1 else
             (T * u_t ** cfg.t_power).ceil().long()).clamp(lo, T)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * u_w.float()
    else:
        t = (torch.randint(t_floor(cfg, step, T), T + 1, (b,), generator=gen) if cfg.t_power == 1 else
             (T * torch.rand(b, generator=gen, dtype=torch.float64) ** cfg.t_power).ceil().long().clamp(1, T))
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=gen)
    if cfg.final_hop:  # final hops from (F - Δ, F] (their y_t trained by the hops from (F, F + Δ]), the rest (F, T]
        final = torch.rand(b, generator=gen) < cfg.final_fraction
        t_final = torch.randint(cfg.final_hop - cfg.delta + 1, cfg.final_hop + 1, (b,), generator=gen)
        t = torch.where(final, t_final, torch.randint(cfg.final_hop + 1, T + 1, (b,), generator=gen))
    return Batch(prompt, noise, t, w, boundary_weights(b, cfg.boundary_fraction),
                 anchor_weights(b, cfg.anchors, cfg.anchor_weight))


def stratified(n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws in [0, 1), one uniform in each slice [k/n, (k+1)/n), in random order (float64): each is
    uniform on [0, 1) like torch.rand's, but a batch covers the range evenly."""
    return (torch.randperm(n, generator=gen).double() + torch.rand(n, generator=gen, dtype=torch.float64)) / n


def t_floor(cfg: RunConfig, step: int, T: int) -> int:
    """The lowest t drawn at `step`: 1, or with --t-sweep N a floor that falls from T to 1 over the first N
    steps (T − floor(T·(step + 1)/N)), so the hops near T, where the chain starts, are trained first."""
    if not cfg.t_sweep or step >= cfg.t_sweep:
        return 1
    return max(1, T - T * (step + 1) // cfg.t_sweep)


def anchor_weights(n: int, rows: int, weight: float) -> torch.Tensor:
    """Per-sample weights of the anchor term (boot.loss.BootLoss `anchor`): `weight` on the first `rows`
    samples of a batch of n (its draws are random, so any rows would do), 0 on the rest."""
    return torch.cat([torch.full((min(rows, n),), float(weight)), torch.zeros(max(n - rows, 0))])


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then constant, a cosine from lr to 0 at step `steps`, or constant until
    the last `cooldown` fraction of the steps and linear from lr down to 0 over it (lr·(steps − step)/n there)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    if cfg.lr_schedule == "cooldown":
        n = max(1, round(cfg.cooldown * cfg.steps))
        return cfg.lr * min(1.0, (cfg.steps - step) / n)
    return cfg.lr

