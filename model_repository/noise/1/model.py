"""Triton Python model `noise`: SEED -> initial latents, GUIDANCE_SCALE -> the checked scale.

Noise contract (docs/interfaces.md), the same in every pipeline:
    noise = numpy.random.default_rng(seed).standard_normal((C, h, w), dtype=float32) * init_noise_sigma
so an image depends only on (prompt, seed, guidance), never on the batch it was served in.

GUIDANCE_SCALE is optional: absent, the student's recommended scale (manifest
"guidance_scale"). Rejected per request: a negative seed (seeds are [0, 2**63 - 1]; INT64
cannot hold more), a NaN/Inf guidance or one outside manifest "guidance_range".
"""

import json
import math
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _invalid(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


class TritonPythonModel:
    def initialize(self, args):
        manifest = json.loads((Path(args["model_repository"]).parent / "manifest.json").read_text())
        self.latent_shape = tuple(int(v) for v in manifest["latent_shape"])
        self.init_noise_sigma = np.float32(manifest["init_noise_sigma"])
        self.low, self.high = (float(v) for v in manifest["guidance_range"])
        self.default_guidance = float(manifest["guidance_scale"])

    def execute(self, requests):
        return [self._noise(request) for request in requests]

    def _noise(self, request):
        seeds = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy().reshape(-1)  # (B,)
        guidance = pb_utils.get_input_tensor_by_name(request, "GUIDANCE_SCALE")
        if guidance is None:
            scales = np.full(seeds.shape, self.default_guidance, dtype=np.float32)
        else:
            scales = guidance.as_numpy().reshape(-1).astype(np.float32)
        for i, (seed, w) in enumerate(zip(seeds.tolist(), scales.tolist())):
            at = f"[{i}]" if len(seeds) > 1 else ""
            if seed < 0:
                return _invalid(f"SEED{at} is {seed}; seeds are integers in [0, 2**63 - 1]")
            if not math.isfinite(w):
                return _invalid(f"GUIDANCE_SCALE{at} is {w}; it must be a finite number")
            if not self.low <= w <= self.high:
                return _invalid(f"GUIDANCE_SCALE{at} is {w}, outside this student's range [{self.low}, {self.high}]")
        noise = np.stack([np.random.default_rng(int(s)).standard_normal(self.latent_shape, dtype=np.float32)
                          for s in seeds.tolist()]) * self.init_noise_sigma  # (B, C, h, w)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("noise", noise.astype(np.float32, copy=False)),
            pb_utils.Tensor("guidance_scale", scales.reshape(-1, 1)),
        ])
