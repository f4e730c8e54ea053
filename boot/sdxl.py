"""SDXL-family conditioning: two text encoders, pooled embeddings and `text_time` added conditioning.

An SDXL UNet (`addition_embed_type == "text_time"`) takes, besides the token states, the
`added_cond_kwargs` of diffusers' StableDiffusionXLPipeline:

    text_states  = concat(enc_1(ids_1).hidden_states[-2], enc_2(ids_2).hidden_states[-2])  (B, 77, D1 + D2)
    text_embeds  = enc_2(ids_2).text_embeds            (B, P): the pooled, projected embedding
    time_ids     = (original_size, crops_coords_top_left, target_size) = (H, W, 0, 0, H, W)

`DualTextEncoder` computes the first two exactly as `StableDiffusionXLPipeline.encode_prompt`
does (no clip skip); it is also the text encoder graph that export traces. A BOOT student makes
images of one size, the teacher's default (UNet sample_size x VAE factor), so its time ids are a
constant of the model, held by the wrappers (boot.method.TeacherX0 / Student) and folded into
the exported UNet graph; only `text_embeds` travels beside the token states.

The unconditional branch of classifier-free guidance follows the folder's pipeline: with
`force_zeros_for_empty_prompt` (model_index.json; SDXL's default) the negative states and
pooled embedding are zeros, else those of the empty prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ADDITION_EMBED_TYPE = "text_time"
N_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
SDXL_FORCE_ZEROS_DEFAULT = True  # StableDiffusionXLPipeline.__init__'s default


def is_sdxl_folder(folder: str | Path) -> bool:
    """A folder with a second text encoder (StableDiffusionXLPipeline layout)."""
    return (Path(folder) / "text_encoder_2").is_dir()


def uses_text_time(unet: nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == ADDITION_EMBED_TYPE


def force_zeros_for_empty_prompt(folder: str | Path) -> bool:
    """`force_zeros_for_empty_prompt` of the folder's model_index.json (the SDXL default when absent)."""
    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else {}
    return bool(config.get("force_zeros_for_empty_prompt", SDXL_FORCE_ZEROS_DEFAULT))


def time_ids(image_size: tuple[int, int]) -> torch.Tensor:
    """(6,) float32 `add_time_ids` of StableDiffusionXLPipeline at its defaults for an H x W image:
    original_size = target_size = (H, W), crops_coords_top_left = (0, 0)."""
    h, w = (int(v) for v in image_size)
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)


def added_cond_kwargs(pooled: torch.Tensor | None, ids: torch.Tensor | None) -> dict | None:
    """diffusers' `added_cond_kwargs` for a batch: the pooled embeddings and the model's time ids."""
    if pooled is None:
        if ids is not None:
            raise ValueError("this UNet takes SDXL added conditioning: pass the pooled text embeddings")
        return None
    if ids is None:
        raise ValueError("pooled text embeddings given to a UNet without `text_time` added conditioning")
    return {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype).expand(pooled.shape[0], -1)}


def unet_kwargs(pooled: torch.Tensor | None, ids: torch.Tensor | None, dtype: torch.dtype | None = None) -> dict:
    """`added_cond_kwargs=...` for a UNet call (pooled cast to `dtype`, a half-precision UNet's), or nothing at
    all for models without added conditioning."""
    added = added_cond_kwargs(pooled if pooled is None or dtype is None else pooled.to(dtype), ids)
    return {} if added is None else {"added_cond_kwargs": added}


def pooled_args(pooled: torch.Tensor | None) -> tuple:
    """The optional pooled argument of a student call: (pooled,), or () where there is none."""
    return () if pooled is None else (pooled,)


def student_time_ids(meta: dict, unet: nn.Module) -> torch.Tensor | None:
    """The time ids a student folder's boot.json records ("added_conditioning"), None for UNets
    without `text_time` conditioning; ValueError where such a UNet has none recorded."""
    if not uses_text_time(unet):
        return None
    ids = meta.get("added_conditioning", {}).get("time_ids")
    if ids is None or len(ids) != N_TIME_IDS:
        raise ValueError(f"the student's UNet takes SDXL `text_time` conditioning but boot.json records no "
                         f"{N_TIME_IDS} added_conditioning.time_ids")
    return torch.tensor([float(v) for v in ids], dtype=torch.float32)


def check_unet(unet: nn.Module, text_hidden: int, pooled_dim: int) -> None:
    """ValueError (one line) unless an SDXL UNet fits its two text encoders."""
    c = unet.config
    if not uses_text_time(unet):
        raise ValueError(f"the folder has two text encoders (SDXL layout) but its UNet's addition_embed_type is "
                         f"{getattr(c, 'addition_embed_type', None)!r}, not {ADDITION_EMBED_TYPE!r}")
    if int(c.cross_attention_dim) != text_hidden:
        raise ValueError(f"the UNet's cross_attention_dim {c.cross_attention_dim} does not match the two text "
                         f"encoders' concatenated width {text_hidden}")
    expected = pooled_dim + N_TIME_IDS * int(c.addition_time_embed_dim)
    if int(c.projection_class_embeddings_input_dim) != expected:
        raise ValueError(f"the UNet's projection_class_embeddings_input_dim {c.projection_class_embeddings_input_dim}"
                         f" != pooled width {pooled_dim} + {N_TIME_IDS} x addition_time_embed_dim "
                         f"{c.addition_time_embed_dim} = {expected}")


class DualTextEncoder(nn.Module):
    """(input_ids, input_ids_2) -> (text_states (B, L, D1 + D2), text_embeds (B, P)): SDXL's
    encode_prompt, penultimate hidden states of both encoders, pooled from the second."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def vocab_size(self) -> int:
        return min(int(self.text_encoder.config.vocab_size), int(self.text_encoder_2.config.vocab_size))

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_1 = self.text_encoder(input_ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return states, out_2.text_embeds


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def load_encoders(folder: Path) -> tuple[object, object, DualTextEncoder]:
    """(tokenizer, tokenizer_2, DualTextEncoder) of an SDXL folder, frozen, in eval mode."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    tok_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, use_safetensors=True)
    enc_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                        use_safetensors=True)
    if tok.model_max_length != tok_2.model_max_length:
        raise ValueError(f"{folder}: tokenizer and tokenizer_2 pad to different lengths "
                         f"({tok.model_max_length} vs {tok_2.model_max_length})")
    return tok, tok_2, DualTextEncoder(enc, enc_2).eval().requires_grad_(False)
