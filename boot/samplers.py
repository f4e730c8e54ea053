"""TeacherSampler: a teacher folder's own deterministic DDIM sampler at k steps, with the project's
one generator signature `gen(prompts, seeds, guidance_scale=None) -> list[PIL.Image]` (plus `name`
and `nfe`), so evaluation, the benchmark and the demo treat teacher-k-steps and the one-step student alike."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from boot import sdxl
from boot.contract import seed_noise_tensor as seed_noise
from boot.contract import to_uint8
from boot.folders import check_folder, load_text_stack, read_meta


class TeacherSampler:
    """The teacher's deterministic DDIM sampler (diffusers' DDIMScheduler, eta=0) at k steps.

    `device`/`dtype`: where and in which precision the UNet runs (weights cast on load; a folder
    stored in fp16 loads as fp32 unless asked otherwise); the VAE and text encoder stay fp32.
    `parts` = (text stack, unet, vae) already loaded (distill.run's teacher): used as they are,
    on their own device and dtype, so no second copy of the teacher is made.
    SDXL-family teachers get their pipeline's added conditioning: the pooled text embeddings and
    the time ids of the default image size, and zeros as the unconditional context where the
    folder forces them (boot.sdxl).
    """

    def __init__(self, folder: str | Path, steps: int, guidance_scale: float | None = None,
                 batch_size: int = 64, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 parts: tuple | None = None):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        folder = check_folder(folder)
        if parts is not None:
            self.text, self.unet, self.vae = parts
        else:
            self.text = load_text_stack(folder)
            self.text.to(device)
            self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=dtype)
            self.vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, torch_dtype=torch.float32)
            self.unet.to(device).eval().requires_grad_(False)
            self.vae.to(device).eval().requires_grad_(False)
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        meta = read_meta(folder)
        self.steps = steps
        self.default_guidance = guidance_scale or meta.get("guidance_scale", 1.0)
        self.batch_size = batch_size
        self.name = f"teacher-{steps}"
        self.nfe = steps * (2 if self.default_guidance != 1.0 else 1)
        c = self.unet.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
        self._uncond, self._uncond_pooled = self.text.unconditional()
        self.time_ids = None
        if sdxl.uses_text_time(self.unet):
            up = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.time_ids = sdxl.time_ids((c.sample_size * up, c.sample_size * up))

    @torch.no_grad()
    def sample_latents(self, states: torch.Tensor, latents: torch.Tensor, w: float,
                       start: int | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from pure noise, or with `start` from latents x_start: the grid's steps at or below it.
        `pooled`: the prompts' pooled embeddings (SDXL family). The UNet runs in its own dtype on its
        device; its output and the DDIM update are fp32."""
        self.scheduler.set_timesteps(self.steps)
        p = next(self.unet.parameters())
        states, latents = states.to(p.device, p.dtype), latents.to(p.device, torch.float32)
        uncond = self._uncond.to(p.device, p.dtype).expand_as(states)
        if pooled is not None:
            pooled = pooled.to(p.device, p.dtype)
        added = sdxl.added_cond_kwargs(pooled, self.time_ids)
        added_both = (None if pooled is None else
                      sdxl.added_cond_kwargs(torch.cat([self._uncond_pooled.to(p.device, p.dtype).expand_as(pooled),
                                                        pooled]), self.time_ids))
        for t in self.scheduler.timesteps:
            if start is not None and int(t) > start:
                continue
            x = latents.to(p.dtype)
            if w == 1.0:
                out = self.unet(x, t, states, added_cond_kwargs=added).sample.float()
            else:
                out_u, out_c = self.unet(torch.cat([x, x]), t, torch.cat([uncond, states]),
                                         added_cond_kwargs=added_both).sample.float().chunk(2)
                out = out_u + w * (out_c - out_u)
            latents = self.scheduler.step(out, t, latents, eta=0.0).prev_sample
        return latents

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int],
                 guidance_scale: float | None = None) -> list[Image.Image]:
        w = self.default_guidance if guidance_scale is None else float(guidance_scale)
        vae = next(self.vae.parameters())
        images = []
        for lo in range(0, len(prompts), self.batch_size):
            p, s = prompts[lo:lo + self.batch_size], seeds[lo:lo + self.batch_size]
            latents = seed_noise(s, self.latent_shape, self.scheduler.init_noise_sigma)
            states, pooled = self.text.encode_pooled(p)
            latents = self.sample_latents(states, latents, w, pooled=pooled)
            decoded = self.vae.decode(latents.to(vae.device, vae.dtype) / self.vae.config.scaling_factor).sample
            images += [Image.fromarray(a) for a in to_uint8(decoded.cpu())]
        return images
