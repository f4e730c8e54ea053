"""The shapes teacher's recipe (TeacherConfig: every hyperparameter, stored with each checkpoint and in
the exported folder's boot_teacher.json) and the two networks it builds (docs/teacher.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from boot import text
from shapes_world.world import CANVAS


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
    """The recipe's noise schedule as a diffusers scheduler config (DDIM; DDPM takes it less two keys)."""
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
        sample_size=CANVAS, mid_block_add_attention=False,
    )


def build_unet(cfg: TeacherConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=CANVAS // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels), down_block_types=tuple(cfg.unet_down),
        up_block_types=tuple(cfg.unet_up), layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=text.HIDDEN_SIZE, attention_head_dim=cfg.attention_heads,
        norm_num_groups=32,
    )


# Recipe fields that define the networks, the latent space and the noise schedule: a continued
# teacher keeps them (training hyperparameters such as batch, LR and steps may change).
ARCHITECTURE = ("vae_channels", "latent_channels", "unet_channels", "unet_down", "unet_up",
                "unet_layers_per_block", "attention_heads", "num_train_timesteps", "beta_start", "beta_end",
                "beta_schedule", "prediction_type", "rescale_betas_zero_snr")


def config_of(stored: dict) -> TeacherConfig:
    """TeacherConfig from its JSON form (a checkpoint's meta or boot_teacher.json's recipe)."""
    return TeacherConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def recipe_of(folder: Path) -> TeacherConfig:
    """The recipe a teacher folder was trained with (its boot_teacher.json)."""
    return config_of(json.loads((Path(folder) / "boot_teacher.json").read_text())["recipe"])
