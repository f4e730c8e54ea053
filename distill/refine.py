"""--refine N: the final-hop refinement's N targets of the frozen starting student, computed once
(chunked, cached in the work folder under a key of everything they depend on)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from boot.folders import STUDENT_META
from boot.loss import BootLoss, bootstrap_target
from boot.method import TeacherX0
from distill import memory, precision
from distill.batches import step_generator
from distill.config import GRAMMAR, RunConfig
from distill.distributed import Dist
from distill.loading import Teacher, build_student, load_prompts

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
    from the frozen starting student's ŷ_t to 0, ceil(F·K/Δ) steps (boot.loss.bootstrap_target)."""

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


def final_hop_targets(cfg: RunConfig, teacher: Teacher, teacher_x0: TeacherX0, loss_fn: BootLoss,
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
    # 2. Targets from the frozen starting student (the target network, never updated), in its own architecture
    #    (a full student whose compact copy trains is its teacher here).
    own = json.loads((Path(cfg.init_from) / STUDENT_META).read_text()).get("compact") \
        if (Path(cfg.init_from) / STUDENT_META).is_file() else None
    frozen = build_student(teacher, teacher_x0.schedule, cfg.init_from, cfg.parameterization, compact=own)
    frozen = frozen.to(dev).eval().requires_grad_(False)
    steps = torch.tensor(loss_fn.final_steps)  # the final hop's teacher steps, as BootLoss takes them
    y = torch.zeros_like(noise, device=dev)

    def targets(j: slice) -> torch.Tensor:  # 1 + 2·ceil(F·K/Δ) UNet calls at batch j's size
        b = j.stop - j.start
        with precision.autocast(dev, cfg.mixed_precision):
            pooled_c, pooled_u = pooled_pair(states.pooled(prompt[j]), uncond_pooled, b)
            return bootstrap_target(frozen, teacher_x0, noise[j].to(dev), states(prompt[j]),
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

