"""BootPipeline: a BOOT student folder as a one-step text-to-image pipeline (PyTorch reference).

    pipe = BootPipeline.from_pretrained("pretrained/shapes-boot")
    images = pipe(["a red circle"], seeds=[0], guidance_scale=4.0)   # list[PIL.Image]

One image = one student evaluation (docs/method.md, `x_0 = g_θ(ε, 0, c, w)`):
  1. text states  c = text_encoder(tokenizer(prompt, padding="max_length"))   (docs/interfaces.md);
                  SDXL family: both encoders' states and the pooled embedding p (boot.sdxl)
  2. noise        ε = default_rng(seed).standard_normal(latent_shape, float32) * init_noise_sigma
  3. latents      x_0 = OneStepGenerator(ε, c, w[, p])
  4. image        vae.decode(x_0 / scaling_factor) -> (x/2 + 0.5).clamp(0, 1) -> round(255 x) uint8

Every step treats each image on its own, so an image depends only on (prompt, seed, guidance),
not on batch size or position (up to float rounding of batched kernels: ≤ 1 uint8 level).
The same contract is implemented by the ONNX pipeline and the Triton model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from boot.contract import MAX_SEED, ChunkedCall, check_inputs, seed_noise_tensor, to_uint8  # noqa: F401

STUDENT_FORMAT = "boot-student/1"


class BootPipeline(ChunkedCall):
    """Text stack + one-step generator + VAE decoder of a student folder.

    Also an evaluator Generator (distill/evaluate.py): `name`, `nfe` and the shared signature
    `pipe(prompts, seeds, guidance_scale=None) -> list[PIL.Image]`.
    """

    name = "student-1"
    nfe = 1

    def __init__(self, text, generator, vae, scheduler_config: dict, meta: dict, batch_size: int = 64):
        from diffusers import DDIMScheduler

        self.text = text  # boot.folders.TextStack
        self.generator = generator  # boot.method.OneStepGenerator
        self.vae = vae  # None: a pixel-space student
        self.meta = meta
        self.scheduler_config = dict(scheduler_config)
        self.init_noise_sigma = float(DDIMScheduler.from_config(self.scheduler_config).init_noise_sigma)
        self.latent_shape = tuple(int(v) for v in meta["latent_shape"])
        lo, hi = (float(v) for v in meta["guidance_range"])
        self.guidance_range = (lo, hi)
        self.guidance_scale = float(meta.get("guidance_scale", lo))
        self.batch_size = batch_size

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> BootPipeline:
        """Load `students/<name>/` (docs/interfaces.md "Student folder")."""
        from diffusers import AutoencoderKL

        from boot import sdxl
        from boot.conditioning import load_student_unet, recorded_conditioning, recorded_guidance_band
        from boot.folders import STUDENT_META, check_folder, load_text_stack
        from boot.method import (
            CONDITIONINGS,
            PARAMETERIZATIONS,
            NoiseSchedule,
            OneStepGenerator,
            Student,
            recorded_parameterization,
            unet_input_timestep,
        )

        folder = check_folder(path, ("unet", "scheduler"))
        if not (folder / STUDENT_META).is_file():
            raise FileNotFoundError(f"{folder} has no {STUDENT_META}: not a BOOT student folder")
        meta = json.loads((folder / STUDENT_META).read_text())
        if meta.get("format") != STUDENT_FORMAT:
            raise ValueError(f"{folder / STUDENT_META}: format {meta.get('format')!r}, expected {STUDENT_FORMAT!r}")
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
        parameterization = recorded_parameterization(meta)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"boot.json parameterization {parameterization!r} is not one of {PARAMETERIZATIONS}")
        expected = unet_input_timestep(parameterization, schedule.T)
        if expected is not None and int(meta["input_timestep"]) != expected:
            raise ValueError(f"boot.json input_timestep {meta['input_timestep']} != scheduler T {schedule.T}")
        conditioning = recorded_conditioning(meta)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"boot.json conditioning kind {conditioning!r} is not one of {CONDITIONINGS}")
        # weights whose form is not the recorded conditioning are refused here, never run (one-line ValueError)
        unet = load_student_unet(folder / "unet", conditioning, recorded_guidance_band(meta)).requires_grad_(False)
        student = Student(unet, schedule, meta["prediction_type"], parameterization, sdxl.student_time_ids(meta, unet))
        generator = OneStepGenerator(student).eval().to(device=device, dtype=dtype)
        vae = None
        if (folder / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
            vae = vae.eval().requires_grad_(False).to(device, dtype)
        elif unet.config.out_channels != 3:  # else its latents would come back as a tiny "image"
            raise FileNotFoundError(f"{folder} has no vae/ folder, but its UNet makes "
                                    f"{unet.config.out_channels}-channel latents, not RGB: "
                                    "copy the teacher's vae/ folder into it")
        text = load_text_stack(folder)
        text.to(device)
        return cls(text, generator, vae, sched_cfg, meta)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    # ----------------------------------------------------------------------------------------
    def check_inputs(self, prompts: list[str], seeds: list[int], guidance_scale: float | None) -> float:
        """Raise ValueError for anything outside the client contract; return the guidance scale."""
        return check_inputs(prompts, seeds, guidance_scale, self.guidance_scale, self.guidance_range,
                            self.text.reads_as_empty)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text states (docs/interfaces.md "Text states")."""
        return self.text.encode(list(prompts)).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_prompt_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) text states and the (B, P) pooled embeddings of SDXL-family students (else None)."""
        states, pooled = self.text.encode_pooled(list(prompts))
        return states.to(self.device, self.dtype), None if pooled is None else pooled.to(self.device, self.dtype)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """(B, C, h, w) initial latents: the noise contract, one PCG64 stream per seed."""
        return seed_noise_tensor([int(s) for s in seeds], self.latent_shape, self.init_noise_sigma)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8, exactly diffusers' postprocess."""
        if self.vae is None:
            return to_uint8(latents.cpu())
        decoded = self.vae.decode(latents.to(self.device, self.dtype) / self.vae.config.scaling_factor).sample
        return to_uint8(decoded.cpu())

    @torch.no_grad()
    def latents(self, prompts: list[str], seeds: list[int], guidance_scale: float | None = None) -> torch.Tensor:
        """x_0 = g_θ(ε, 0, c, w) for each (prompt, seed): one student evaluation."""
        w = self.check_inputs(prompts, seeds, guidance_scale)
        noise = self.noise(seeds).to(self.device, self.dtype)
        scale = torch.full((len(prompts),), w, device=self.device, dtype=torch.float32)
        if not self.text.pooled:
            return self.generator(noise, self.encode_prompt(prompts), scale)
        states, pooled = self.encode_prompt_pooled(prompts)
        return self.generator(noise, states, scale, pooled)
