"""OnnxPipeline: prompt -> image with ONNX Runtime only, from an exported model repository.

    pipe = OnnxPipeline.from_pretrained("model_repository")
    images = pipe(["a red circle"], seeds=[0], guidance_scale=4.0)   # list[PIL.Image]

The same contract and call signature as BootPipeline (docs/interfaces.md), with no PyTorch:
  1. input_ids    tokenizer.json of the repository (padding/truncation to L built in)
  2. text states  text_encoder/1/model.onnx
  3. noise        default_rng(seed).standard_normal(latent_shape, float32) * init_noise_sigma
  4. latents      boot_unet/1/model.onnx (noise, text_states, guidance_scale)
  5. image        vae_decoder/1/model.onnx, uint8 postprocess inside the graph
SDXL-family repositories (manifest "tokenizer_2"): a second tokenizer gives input_ids_2, the text
encoder also returns text_embeds (the pooled embedding), and boot_unet takes them.
Providers: CUDA (and TensorRT when asked for) only where a GPU and their libraries exist,
else CPU (boot_serve.runtime.default_providers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import boot_serve.runtime as runtime

MODELS = ("text_encoder", "boot_unet", "vae_decoder")


class OnnxPipeline(runtime.ChunkedCall):
    """Tokenizer + three ONNX Runtime sessions of a repository written by boot_serve.export.

    Also an evaluator Generator (distill/evaluate.py): `name`, `nfe` and the shared signature
    `pipe(prompts, seeds, guidance_scale=None) -> list[PIL.Image]`.
    """

    name = "student-1-onnx"
    nfe = 1

    def __init__(self, tokenizer, sessions: dict, manifest: dict, batch_size: int = 64, tokenizer_2=None):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer, padding + truncation enabled
        self.tokenizer_2 = tokenizer_2  # SDXL family: the second encoder's tokenizer, else None
        self.sessions = sessions
        self.manifest = manifest
        self.latent_shape = tuple(int(v) for v in manifest["latent_shape"])
        self.max_length = int(manifest["max_length"])
        self.init_noise_sigma = float(manifest["init_noise_sigma"])
        lo, hi = (float(v) for v in manifest["guidance_range"])
        self.guidance_range = (lo, hi)
        self.guidance_scale = float(manifest["guidance_scale"])
        self.batch_size = batch_size
        self.empty_ids = tokenizer.encode("").ids  # special tokens and padding only

    @classmethod
    def from_pretrained(cls, repository: str | Path, providers=None, threads: int | None = None,
                        batch_size: int = 64) -> OnnxPipeline:
        """Load `model_repository/` (docs/interfaces.md "ONNX model repository")."""
        from tokenizers import Tokenizer

        repo = Path(repository)
        path = repo / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{repo} has no manifest.json: fill it with `python -m boot_serve.export`")
        manifest = json.loads(path.read_text())
        sessions = {}
        for model in MODELS:
            onnx_path = repo / manifest["graphs"][model]["path"]
            if not onnx_path.is_file():
                raise FileNotFoundError(f"{onnx_path} is missing: re-run `python -m boot_serve.export`")
            sessions[model] = runtime.session(onnx_path, providers, threads)
        tokenizers = []
        for key in ("tokenizer", "tokenizer_2"):
            if key not in manifest:
                continue
            tokenizer = Tokenizer.from_file(str(repo / manifest[key] / "tokenizer.json"))
            if tokenizer.padding is None or tokenizer.truncation is None:
                raise ValueError(f"{repo / manifest[key]}/tokenizer.json has no padding/truncation "
                                 "settings: not written by boot_serve.export")
            tokenizers.append(tokenizer)
        return cls(tokenizers[0], sessions, manifest, batch_size, *tokenizers[1:])

    @property
    def providers(self) -> list[str]:
        return self.sessions["boot_unet"].get_providers()

    # ----------------------------------------------------------------------------------------
    def check_inputs(self, prompts: list[str], seeds: list[int], guidance_scale: float | None) -> float:
        """Raise ValueError for anything outside the client contract; return the guidance scale."""
        return runtime.check_inputs(prompts, seeds, guidance_scale, self.guidance_scale, self.guidance_range,
                                    self.reads_as_empty)

    def reads_as_empty(self, prompt: str) -> bool:
        """Whether the (first) tokenizer gives `prompt` the empty prompt's ids: refused as empty, as
        BootPipeline's TextStack.reads_as_empty refuses it (the first tokenizer decides there too)."""
        return self.tokenizer.encode(prompt).ids == self.empty_ids

    def tokenize(self, prompts: list[str], second: bool = False) -> np.ndarray:
        """(B, L) int64 ids, as `tokenizer(prompts, padding="max_length", truncation=True)` (`second`:
        tokenizer_2's, SDXL family)."""
        tokenizer = self.tokenizer_2 if second else self.tokenizer
        ids = np.array([e.ids for e in tokenizer.encode_batch(list(prompts))], dtype=np.int64)
        if ids.shape != (len(prompts), self.max_length):
            raise ValueError(f"tokenizer gave ids of shape {ids.shape}, expected {(len(prompts), self.max_length)}")
        return ids

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        """(B, L, D) float32 text states (docs/interfaces.md "Text states")."""
        return self.encode_prompt_pooled(prompts)[0]

    def encode_prompt_pooled(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, L, D) text states and the (B, P) pooled text_embeds of SDXL-family repositories (else None)."""
        if self.tokenizer_2 is None:
            return self.sessions["text_encoder"].run(["text_states"], {"input_ids": self.tokenize(prompts)})[0], None
        feeds = {"input_ids": self.tokenize(prompts), "input_ids_2": self.tokenize(prompts, second=True)}
        states, embeds = self.sessions["text_encoder"].run(["text_states", "text_embeds"], feeds)
        return states, embeds

    def noise(self, seeds: list[int]) -> np.ndarray:
        """(B, C, h, w) initial latents: the noise contract, one PCG64 stream per seed."""
        return runtime.seed_noise(seeds, self.latent_shape, self.init_noise_sigma)

    def latents(self, prompts: list[str], seeds: list[int], guidance_scale: float | None = None) -> np.ndarray:
        """x_0 = g_θ(ε, 0, c, w) for each (prompt, seed): one student evaluation."""
        w = self.check_inputs(prompts, seeds, guidance_scale)
        states, embeds = self.encode_prompt_pooled(prompts)
        feeds = {"noise": self.noise(seeds), "text_states": states,
                 "guidance_scale": np.full((len(prompts),), w, dtype=np.float32)}
        if embeds is not None:
            feeds["text_embeds"] = embeds
        return self.sessions["boot_unet"].run(["latents"], feeds)[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8."""
        return self.sessions["vae_decoder"].run(["image"], {"latents": np.ascontiguousarray(latents)})[0]
