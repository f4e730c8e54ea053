"""What a run starts from: its prompts, the frozen teacher folder (checked and loaded once) and the
student built from the teacher's UNet (or from a student folder with --init-from)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from boot.compact import compact_unet
from boot.conditioning import load_student_unet, recorded_conditioning, recorded_guidance_band
from boot.folders import (
    STUDENT_META,
    check_folder,
    describe_error,
    load_text_stack,
    read_meta,
)
from boot.method import (
    DEFAULT_CONDITIONING,
    DEFAULT_PARAMETERIZATION,
    NoiseSchedule,
    Student,
    add_condition_projection,
    parameterization_name,
    recorded_parameterization,
)
from distill import memory
from distill.config import GRAMMAR, RunConfig


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (UTF-8); blank lines are skipped. ValueError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{i}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one prompt per line expected)")
    return prompts


def load_prompts(cfg: RunConfig) -> tuple[list[str], dict]:
    """Training prompts and the provenance record stored in boot.json."""
    if cfg.prompts == GRAMMAR:
        from shapes_world import world

        prompts = world.sample_captions(cfg.num_prompts, cfg.seed, "train")
        return prompts, {"source": GRAMMAR, "split": "train", "seed": cfg.seed, "count": len(prompts),
                         "distinct": len(set(prompts))}
    prompts = read_prompts(cfg.prompts)
    digest = hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
    return prompts, {"source": cfg.prompts, "sha256": digest, "count": len(prompts),
                     "distinct": len(set(prompts))}


@dataclass
class Teacher:
    """The parts of a teacher folder distillation needs (everything frozen)."""

    folder: Path
    text: object  # boot.folders.TextStack
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    meta: dict

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        h, w = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else c.sample_size
        return (c.in_channels, h, w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        up = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.latent_shape[1] * up, self.latent_shape[2] * up, 3)

    @property
    def time_ids(self) -> torch.Tensor | None:
        """SDXL's constant add_time_ids for the image size distilled (boot.sdxl), else None."""
        from boot import sdxl

        return sdxl.time_ids(self.image_shape[:2]) if sdxl.uses_text_time(self.unet) else None


class TeacherLoadError(ValueError):
    """A teacher folder whose files are missing or unreadable (message names the part)."""


def load_teacher(folder: str | Path, dtype: torch.dtype = torch.float32) -> Teacher:
    """The frozen teacher, its UNet cast to `dtype` and its VAE and text encoder to fp32, whatever dtype
    the folder stores (distill.precision)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_folder(folder)
    part = "scheduler"
    try:
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=dtype)
        unet.eval().requires_grad_(False)
        part = "vae"
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, torch_dtype=torch.float32)
        vae.eval().requires_grad_(False)
        part = "text encoder"
        text_stack = load_text_stack(folder)
        text_stack.text_encoder.float()
    except Exception as err:  # diffusers/safetensors raise OSError, ValueError, SafetensorError, ...
        raise TeacherLoadError(f"cannot load the teacher from {folder}: its {part} is missing or corrupt "
                               f"({describe_error(err)})") from err
    check_added_conditioning(folder, unet, text_stack)
    return Teacher(folder, text_stack, unet, vae, sched_cfg, read_meta(folder))


def check_added_conditioning(folder: Path, unet: torch.nn.Module, text_stack) -> None:
    """TeacherLoadError unless the UNet's added conditioning and the text stack fit (SDXL family)."""
    from boot import sdxl

    if text_stack.pooled:
        try:
            sdxl.check_unet(unet, text_stack.text_encoder.hidden_size, text_stack.text_encoder.pooled_size)
        except ValueError as err:
            raise TeacherLoadError(f"cannot distil {folder}: {err}") from None
    elif getattr(unet.config, "addition_embed_type", None) is not None:
        raise TeacherLoadError(f"cannot distil {folder}: its UNet takes {unet.config.addition_embed_type!r} added "
                               "conditioning, which needs the SDXL layout (text_encoder_2/ and tokenizer_2/)")


def warn_long_prompts(text, prompts: list[str], source: str | None) -> None:
    """Prompts over the text encoder's token limit are truncated by it (as diffusers does); say which."""
    limit = getattr(text.tokenizer, "model_max_length", None)
    if not limit or limit > 10**6:
        return
    lengths = text.tokenizer(prompts, truncation=False)["input_ids"]
    long = [i for i, ids in enumerate(lengths) if len(ids) > limit]
    if not long:
        return
    where = ""
    if source:
        lines = [i for i, raw in enumerate(Path(source).read_bytes().splitlines(), start=1) if raw.strip()]
        shown = ", ".join(str(lines[i]) for i in long[:10]) + (", ..." if len(long) > 10 else "")
        where = f" ({Path(source).name} line{'s' if len(long) > 1 else ''} {shown})"
    print(f"warning: {len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} tokens"
          f"{where}; they are truncated to {limit} tokens for distillation, and the served model rejects them",
          file=sys.stderr)


def build_student(teacher: Teacher, schedule: NoiseSchedule, init_from: str | None = None,
                  parameterization: str = DEFAULT_PARAMETERIZATION, lora_rank: int = 0,
                  conditioning: str = DEFAULT_CONDITIONING, guidance_band: float = 0.0,
                  sinusoid_space: tuple[float, float] | None = None, compact: str | None = None) -> Student:
    """g_θ: the teacher's UNet (its own fp32 copy, from disk) + the zero-initialised condition projection,
    or the UNet of the student folder `init_from` (same architecture as the teacher's and the same
    output parameterization); with `lora_rank` R > 0, frozen, with rank-R adapters (distill.lora). New students
    get `conditioning` (boot.method.CONDITIONINGS), `guidance_band` (0: none) and, with `sinusoid_space` (a guidance
    range), the SinusoidSpaceProjection training form; `init_from` keeps its own (in the plain form it was saved in).
    `compact` (boot.compact.RULES): the UNet with blocks removed by that rule, its kept weights those of the teacher,
    or of `init_from` (a full student made compact, or a compact student of the same rule continued)."""
    from diffusers import UNet2DConditionModel

    if init_from:
        meta_path = Path(init_from) / STUDENT_META
        theirs = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if recorded_parameterization(theirs) != parameterization_name(parameterization):
            raise ValueError(f"--init-from {init_from} reads its UNet as {recorded_parameterization(theirs)!r}, "
                             f"not --parameterization {parameterization!r}")
        conditioning = recorded_conditioning(theirs)
        guidance_band = recorded_guidance_band(theirs)
        sinusoid_space = None
        if theirs.get("compact") and theirs["compact"] != compact:
            raise ValueError(f"--init-from {init_from} is a compact student ({theirs['compact']!r}): continue it with "
                             f"--compact {theirs['compact']}, not {compact or 'the teacher architecture'}")

    unet = UNet2DConditionModel.from_pretrained(teacher.folder / "unet", use_safetensors=True,
                                                torch_dtype=torch.float32)
    if compact:
        unet = compact_unet(unet, compact)
    unet = add_condition_projection(unet, conditioning, guidance_band or None, sinusoid_space)
    if init_from:
        try:
            trained = load_student_unet(Path(init_from) / "unet", conditioning, guidance_band or None).state_dict()
            # a full student made compact keeps the weights of the modules the rule keeps
            unet.load_state_dict({k: trained[k] for k in unet.state_dict()} if compact else trained)
        except Exception as err:
            raise TeacherLoadError(f"cannot load the student to start from, {init_from}: "
                                   f"{describe_error(err)}") from err
    unet = unet.float()
    if lora_rank:
        from distill import lora

        unet = lora.add_lora(unet, lora_rank)
    return Student(unet.train(), schedule, teacher.prediction_type, parameterization, teacher.time_ids)


def freeze_parameters(unet: torch.nn.Module, patterns: tuple[str, ...]) -> int:
    """Keep every trainable UNet parameter whose name contains one of `patterns` at its starting value
    (requires_grad off, so the optimizer never sees it); the number of weights frozen. A pattern that names no
    trainable parameter is refused, with an example of the names there are."""
    trainable = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    for pattern in patterns:
        if not any(pattern in name for name, _ in trainable):
            example = next((name for name, _ in trainable if "attn2" in name), trainable[0][0] if trainable else "")
            raise ValueError(f"--freeze {pattern!r} names no trainable UNet parameter (names look like {example!r})")
    frozen = 0
    for name, p in trainable:
        if any(pattern in name for pattern in patterns):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


@torch.no_grad()
def encode_prompts(text, prompts: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states once per distinct prompt: (states (N_distinct, L, D), row of each prompt (N,))."""
    cache = memory.PromptStates(text, prompts, "fp32", chunk=chunk)
    return cache.table, cache.rows


def recommended_guidance(cfg: RunConfig, teacher: Teacher) -> float:
    """--guidance-scale, else the teacher's recommendation, clamped into the trained range."""
    if cfg.guidance_scale is not None:
        return float(cfg.guidance_scale)
    w = float(teacher.meta.get("guidance_scale", 7.5))
    return min(max(w, cfg.guidance_min), cfg.guidance_max)

