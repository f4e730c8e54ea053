"""The tiny decoder's model and training (distill.tiny_decoder): the recipe, an AutoencoderTiny sized to a
student's VAE, the latent pools made from the student (or its teacher) and the training loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from boot import checkpoint
from boot.decoders import DecoderMismatch, check_fits

SOURCES = ("student", "teacher", "both")
FIRST_SEED = 3_000_000  # noise seeds of the training pool; the held-out pool's start at HELD_OUT_SEED
HELD_OUT_SEED = 4_000_000


@dataclass
class Recipe:
    """Everything a run depends on (stored in tiny_decoder.json and every checkpoint)."""

    student: str
    teacher: str | None = None
    source: str = "student"
    teacher_steps: int = 8
    channels: int = 16
    blocks: tuple[int, ...] = (2, 2, 1)
    pool: int = 4096
    held_out: int = 256
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    l1: float = 1.0
    mse: float = 1.0
    seed: int = 0




# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def build_tiny(vae_config, channels: int, blocks: tuple[int, ...]):
    """An AutoencoderTiny reading the latents of a VAE with `vae_config`: its latent channels, scaling and
    shift factor, one decoder level per VAE level (so the same upsampling), `blocks[i]` AutoencoderTinyBlocks
    of `channels` at level i. The encoder is the smallest AutoencoderTiny allows (not trained here)."""
    from diffusers import AutoencoderTiny

    levels = len(vae_config.block_out_channels)
    if len(blocks) != levels:
        raise ValueError(f"--blocks needs one count per level of the student's VAE ({levels}), got {list(blocks)}")
    return AutoencoderTiny(
        in_channels=int(vae_config.in_channels), out_channels=int(vae_config.out_channels),
        latent_channels=int(vae_config.latent_channels), scaling_factor=float(vae_config.scaling_factor),
        shift_factor=float(getattr(vae_config, "shift_factor", None) or 0.0),
        decoder_block_out_channels=(channels,) * levels, num_decoder_blocks=tuple(blocks),
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels)


def full_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The student's decoder as BootPipeline runs it: vae.decode(latents / scaling_factor), in [-1, 1]-ish."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def tiny_decode(tiny, latents: torch.Tensor) -> torch.Tensor:
    return tiny.decode(latents / tiny.config.scaling_factor).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output -> (B, H, W, 3) uint8: diffusers' postprocess (boot.contract.to_uint8)."""
    from boot.contract import to_uint8 as contract_uint8

    return contract_uint8(x.detach().cpu())


# --------------------------------------------------------------------------------------------
# Latent pools
# --------------------------------------------------------------------------------------------
def _pool_key(recipe: Recipe, split: str, n: int, first_seed: int) -> str:
    from distill.selection import unet_sha256

    parts = {"student": recipe.student, "student_unet": unet_sha256(recipe.student), "source": recipe.source,
             "teacher": recipe.teacher, "teacher_steps": recipe.teacher_steps, "split": split, "n": n,
             "first_seed": first_seed, "seed": recipe.seed}
    if recipe.source != "student" and recipe.teacher:
        parts["teacher_unet"] = unet_sha256(recipe.teacher)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def make_latents(pipe, recipe: Recipe, split: str, n: int, first_seed: int, chunk: int = 64) -> tuple:
    """n latents and their captions: captions of `split`, seeds first_seed + i, one guidance scale per chunk
    drawn uniformly from the student's range; the student's one step, or the teacher's DDIM (--source)."""
    from shapes_world import world

    captions = world.sample_captions(n, recipe.seed + 17, split)
    rng = np.random.default_rng([recipe.seed, first_seed])
    lo, hi = pipe.guidance_range
    sampler = None
    if recipe.source != "student":
        from boot.samplers import TeacherSampler

        sampler = TeacherSampler(recipe.teacher, recipe.teacher_steps)
    out = []
    for start in tqdm(range(0, n, chunk), desc=f"latents ({split}, {recipe.source})", leave=False):
        p = captions[start:start + chunk]
        seeds = [first_seed + i for i in range(start, start + len(p))]
        w = float(rng.uniform(lo, hi))
        use_teacher = recipe.source == "teacher" or (recipe.source == "both" and (start // chunk) % 2 == 1)
        with torch.no_grad():
            if use_teacher:
                noise = pipe.noise(seeds) * (sampler.scheduler.init_noise_sigma / pipe.init_noise_sigma)
                states, pooled = sampler.text.encode_pooled(p)
                out.append(sampler.sample_latents(states, noise, w, pooled=pooled).float())
            else:
                out.append(pipe.latents(p, seeds, w).float())
    return torch.cat(out), captions


def load_pool(pipe, recipe: Recipe, split: str, n: int, first_seed: int, work: Path) -> dict[str, torch.Tensor]:
    """{"latents", "targets"} of a pool, made once into `work` (targets: the full decoder's output clamped to
    [-1, 1], stored in fp16) and read back on later runs."""
    from safetensors.torch import load_file, save_file

    path = work / f"pool-{split}-{_pool_key(recipe, split, n, first_seed)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    latents, _ = make_latents(pipe, recipe, split, n, first_seed)
    targets = []
    with torch.no_grad():
        for start in tqdm(range(0, n, 64), desc=f"full decoder ({split})", leave=False):
            targets.append(full_decode(pipe.vae, latents[start:start + 64]).clamp(-1, 1).half())
    pool = {"latents": latents.contiguous(), "targets": torch.cat(targets).contiguous()}
    tmp = path.with_suffix(".tmp")
    save_file(pool, str(tmp))
    os.replace(tmp, path)
    return pool


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine to 5% of --lr (a function of the step only: resumable)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_rows(recipe: Recipe, step: int, n: int) -> torch.Tensor:
    from distill.batches import step_generator

    return torch.randint(0, n, (recipe.batch_size,), generator=step_generator(recipe.seed, step))


def losses(recipe: Recipe, out: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    l1 = (out - target).abs().mean()
    mse = ((out - target) ** 2).mean()
    return {"loss": recipe.l1 * l1 + recipe.mse * mse, "l1": l1, "mse": mse}


def train(tiny, pool: dict[str, torch.Tensor], recipe: Recipe, work: Path, resume: bool,
          checkpoint_every: int, student_vae_config, max_minutes: float | None = None) -> int:
    """Train tiny.decoder on the pool up to recipe.steps; returns the step reached."""
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    ckpt_dir, start = work / "checkpoints", 0
    if resume and (last := checkpoint.latest(ckpt_dir)) is not None:
        meta = json.loads((last / "meta.json").read_text())["meta"]
        check_fits(meta.get("tiny_config", {}), student_vae_config, f"checkpoint {last}")
        was = meta.get("recipe", {})
        if was.get("channels") != recipe.channels or list(was.get("blocks", [])) != list(recipe.blocks):
            raise DecoderMismatch(f"checkpoint {last} is a tiny decoder of --channels {was.get('channels')} "
                                  f"--blocks {was.get('blocks')}, not {recipe.channels} {list(recipe.blocks)}")
        start = checkpoint.load(last, {"decoder": tiny.decoder}, opt)["step"]
        print(f"[tiny_decoder] resumed from {last} (step {start})", flush=True)
    elif not resume and checkpoint.latest(ckpt_dir) is not None:
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or another --work to start afresh")
    latents, targets = pool["latents"], pool["targets"]
    meta = {"recipe": asdict(recipe), "tiny_config": dict(tiny.config)}
    log = open(work / "loss.jsonl", "a")  # noqa: SIM115 - closed below
    tiny.decoder.train()
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")
    step = start
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="tiny decoder", smoothing=0.1)
    try:
        for step in bar:
            rows = batch_rows(recipe, step, len(latents))
            lr = learning_rate(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            out = tiny_decode(tiny, latents[rows])
            parts = losses(recipe, out, targets[rows].float())
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            values = {k: float(v.detach()) for k, v in parts.items()}
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.1e}")
            if step % 10 == 0:
                log.write(json.dumps({"step": step, "lr": lr, **values}) + "\n")
            done = step + 1
            if done % checkpoint_every == 0 or done == recipe.steps or time.monotonic() > deadline:
                checkpoint.save(ckpt_dir, done, {"decoder": tiny.decoder}, opt, meta)
                log.flush()
            if time.monotonic() > deadline:
                print(f"[tiny_decoder] --max-minutes reached at step {done}; --resume continues", flush=True)
                return done
        step = recipe.steps
    finally:
        bar.close()
        log.close()
        tiny.decoder.eval()
    return max(step, start)
