"""The client contract every pipeline keeps (docs/interfaces.md): the input checks, the seed -> noise
rule and the image postprocess. numpy only at import time, so Triton-side code and clients can use it
without PyTorch."""

from __future__ import annotations

import math
import unicodedata
from numbers import Integral, Real

import numpy as np

MAX_SEED = 2**63 - 1

# --------------------------------------------------------------------------------------------
# Prompt content: a prompt made only of characters nobody sees (zero-width and format characters,
# NUL and other controls, spaces, combining marks with nothing to combine with, blank "letters") says
# nothing; most such prompts tokenize to the empty prompt's tokens and make its image. It is refused
# with the empty prompt's error. boot_serve/triton_model.py holds a copy of the three definitions below
# (it imports no project package); tests/test_prompt_content.py keeps the copy equal.
#
# Unassigned code points (category Cn) count as content: one unassigned in this Python's Unicode
# version may be a visible emoji in another Python's (the Triton container's, a client's), and one
# pipeline would refuse what another serves. Only the code points Unicode keeps invisible for good are
# listed (noncharacters, reserved default-ignorable).
# No NFKC first: NFKC turns visible spacing accents (U+00B4 ´, U+00A8 ¨, U+037A ͺ, U+309B ゛: 52
# characters of the BMP) into a space and a combining mark, so it would refuse prompts the tokenizers
# read as text, and it finds nothing invisible that the rule misses: the fillers it maps to U+1160
# (U+3164, U+FFA0) are listed.
NO_CONTENT_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zs", "Zl", "Zp", "Mn", "Me"})
NO_CONTENT_CHARACTERS = frozenset({
    0x115F, 0x1160, 0x3164, 0xFFA0,  # Hangul fillers (Lo): blank by design
    0x2800,  # BRAILLE PATTERN BLANK (So)
    0x1D159,  # MUSICAL SYMBOL NULL NOTEHEAD (So): no glyph
    0x2065, *range(0xFFF0, 0xFFF9),  # reserved default-ignorable (Cn): only invisible characters ever go here
    *range(0xFDD0, 0xFDF0),  # noncharacters (Cn); the U+xFFFE/U+xFFFF of every plane are tested in has_content
})


def has_content(text: str) -> bool:
    """Whether `text` has a character that can be seen: one outside NO_CONTENT_CATEGORIES and
    NO_CONTENT_CHARACTERS, not whitespace, not a noncharacter, not in the tag / variation selector
    block U+E0000-U+E0FFF (format characters or reserved default-ignorable)."""
    for ch in text:
        cp = ord(ch)
        if not (ch.isspace() or unicodedata.category(ch) in NO_CONTENT_CATEGORIES or cp in NO_CONTENT_CHARACTERS
                or cp & 0xFFFE == 0xFFFE or 0xE0000 <= cp <= 0xE0FFF):
            return True
    return False


# --------------------------------------------------------------------------------------------
def check_inputs(prompts, seeds, guidance_scale, default_guidance: float,
                 guidance_range: tuple[float, float], reads_as_empty=None) -> float:
    """Raise ValueError for anything outside the client contract; return the guidance scale.

    The same rules and messages as `BootPipeline.check_inputs`: a non-empty list of prompts with
    content (`has_content`; a prompt without any is refused as the empty prompt is), one integer seed
    in [0, 2**63 - 1] per prompt, a finite guidance inside the student's range (None: the student's
    recommended value). `reads_as_empty(prompt) -> bool`, where a pipeline has its tokenizer: the
    prompt tokenizes to the empty prompt's ids, also refused as empty (what the character rule misses
    for that tokenizer, U+FFFD for MiniLM's, say).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise ValueError("seeds must be a list of integers")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; one seed per prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not has_content(p) or (reads_as_empty is not None and reads_as_empty(p)):
            raise ValueError(f"prompt {i} must be a non-empty string, got {p!r}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, Integral) or not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seed {i} must be an integer in [0, 2**63 - 1], got {s!r}")
    w = default_guidance if guidance_scale is None else guidance_scale
    if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    lo, hi = guidance_range
    if not lo <= float(w) <= hi:
        raise ValueError(f"guidance_scale {float(w)} is outside this student's range [{lo}, {hi}]")
    return float(w)


class ChunkedCall:
    """`pipe(prompts, seeds, guidance_scale=None) -> list[PIL.Image]` for a pipeline with
    `check_inputs`, `latents`, `decode` and `batch_size`: validate everything first, then run
    in chunks of `batch_size` (images do not depend on the chunking)."""

    def __call__(self, prompts, seeds, guidance_scale=None):
        from PIL import Image

        self.check_inputs(prompts, seeds, guidance_scale)
        images = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk = slice(lo, lo + self.batch_size)
            arrays = self.decode(self.latents(list(prompts[chunk]), list(seeds[chunk]), guidance_scale))
            images += [Image.fromarray(a) for a in arrays]
        return images


def seed_noise(seeds, latent_shape: tuple[int, ...], init_noise_sigma: float = 1.0) -> np.ndarray:
    """(B, C, h, w) float32 initial latents: one PCG64 stream per seed (docs/interfaces.md)."""
    noise = np.stack([np.random.default_rng(int(s)).standard_normal(tuple(latent_shape), dtype=np.float32)
                      for s in seeds])
    return noise * np.float32(init_noise_sigma)


def seed_noise_tensor(seeds, shape: tuple[int, ...], init_noise_sigma: float = 1.0):
    """seed_noise as a torch tensor (the PyTorch pipelines and the evaluator)."""
    import torch

    return torch.from_numpy(seed_noise(seeds, shape, init_noise_sigma))


def to_uint8(decoded) -> np.ndarray:
    """(B, 3, H, W) VAE output in [-1, 1] (a torch tensor) -> (B, H, W, 3) uint8, as diffusers postprocesses."""
    x = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
