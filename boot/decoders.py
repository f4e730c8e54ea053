"""Tiny decoders: a diffusers AutoencoderTiny folder (TAESD's architecture) that decodes a student's
latents in place of its full VAE decoder (written by `python -m distill.tiny_decoder`).

A tiny decoder fits a student when it reads the same latents the same way: the same latent channels and
the same scaling factor (diffusers decodes `vae.decode(latents / vae.config.scaling_factor)`, so a tiny
decoder with the student VAE's scaling factor is a drop-in `pipe.vae`). Anything else is refused, in one
line naming both values, wherever a tiny decoder meets a student: when it is written and when it is loaded.

    from boot.decoders import load_tiny_decoder
    pipe.vae = load_tiny_decoder("students/shapes-tiny-decoder", pipe.vae.config)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TINY_FORMAT = "boot-tiny-decoder/1"
TINY_META = "tiny_decoder.json"  # beside diffusers' config.json: how it was made, what it measured


class DecoderMismatch(ValueError):
    """A tiny decoder whose latents are not the student's (one line, both values named)."""


def _value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def check_fits(tiny_config, student_vae_config, where: str = "tiny decoder") -> None:
    """DecoderMismatch unless `tiny_config` (an AutoencoderTiny config) reads `student_vae_config`'s latents:
    same latent_channels, same scaling_factor (and shift_factor, 0 where absent)."""
    problems = []
    tiny_c, student_c = _value(tiny_config, "latent_channels"), _value(student_vae_config, "latent_channels")
    if tiny_c is None or student_c is None or int(tiny_c) != int(student_c):
        problems.append(f"latent_channels {tiny_c} (student's VAE: {student_c})")
    tiny_s, student_s = _value(tiny_config, "scaling_factor"), _value(student_vae_config, "scaling_factor")
    if tiny_s is None or student_s is None or not math.isclose(float(tiny_s), float(student_s), rel_tol=1e-6):
        problems.append(f"scaling_factor {tiny_s} (student's VAE: {student_s})")
    tiny_f, student_f = (_value(c, "shift_factor") or 0.0 for c in (tiny_config, student_vae_config))
    if not math.isclose(float(tiny_f), float(student_f), abs_tol=1e-9):
        problems.append(f"shift_factor {tiny_f} (student's VAE: {student_f})")
    if problems:
        raise DecoderMismatch(f"{where} does not fit the student: " + "; ".join(problems))


def read_tiny_config(folder: str | Path) -> dict:
    """config.json of a tiny decoder folder (an AutoencoderTiny), checked to be one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a tiny decoder folder "
                                "(python -m distill.tiny_decoder writes one)")
    config = json.loads(path.read_text())
    if config.get("_class_name") != "AutoencoderTiny":
        raise DecoderMismatch(f"{folder} holds a {config.get('_class_name')}, not an AutoencoderTiny")
    return config


def load_tiny_decoder(folder: str | Path, student_vae_config, device="cpu", dtype=None):
    """The AutoencoderTiny of `folder`, refused (DecoderMismatch) before any weight loads unless it fits
    the student whose VAE config is `student_vae_config`."""
    import torch
    from diffusers import AutoencoderTiny

    check_fits(read_tiny_config(folder), student_vae_config, f"tiny decoder {folder}")
    tiny = AutoencoderTiny.from_pretrained(folder, use_safetensors=True)
    return tiny.eval().requires_grad_(False).to(device, dtype or torch.float32)
