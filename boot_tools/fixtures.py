"""Random-weight teacher folders of the real Stable Diffusion architecture families.

    python -m boot_tools.fixtures --arch sd15 --size tiny --out /tmp/sd15-tiny
    python -m boot_tools.fixtures --arch sdxl --size full --dtype fp16 --out /tmp/sdxl

No pretrained text-to-image weights can be downloaded here, so the SD-family code paths are proven
on folders that have the published architectures (or, with `--size tiny`, the same components and
conditioning paths at toy widths) and random weights. Each folder is a plain diffusers pipeline
folder, written by the diffusers pipeline class itself (`model_index.json` and one subfolder per
component), as a user's own Stable Diffusion folder would be.

    sd15  CLIP ViT-L text (768, last layer); cross-attention 768; epsilon, scaled_linear, leading;
          latents 4x64x64 (512²)
    sd2   OpenCLIP ViT-H text (1024; 23 of 24 layers, pad "!"); cross-attention 1024, linear
          projections; v-prediction; latents 4x96x96 (768²)
    sdxl  CLIP ViT-L + OpenCLIP bigG (penultimate layers concatenated) and the pooled bigG
          embedding; cross-attention 2048 + `text_time` added conditioning; epsilon; 4x128x128 (1024²)

The tokenizers are real: the CLIP BPE vocabulary ships in the PyPI package `open_clip_torch`
(`open_clip/bpe_simple_vocab_16e6.txt.gz`), read from the installed distribution's files without
importing `open_clip` (whose `__init__` needs torchvision), and written as the vocab.json +
merges.txt pair that `CLIPTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import sys
from pathlib import Path

import torch

ARCHS = ("sd15", "sd2", "sdxl")
SIZES = ("tiny", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGE = "open_clip_torch"
CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48,894 merges + 2 special tokens
N_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# CLIP tokenizer
# --------------------------------------------------------------------------------------------
def bpe_path() -> Path:
    """The CLIP BPE merges file inside the installed `open_clip_torch` distribution."""
    try:
        dist = importlib.metadata.distribution(BPE_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"the CLIP vocabulary comes from the PyPI package {BPE_PACKAGE}; install it "
                                f"with `pip install --no-deps {BPE_PACKAGE}`") from err
    path = Path(dist.locate_file(BPE_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{BPE_PACKAGE} is installed but has no {BPE_FILE}")
    return path


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in CLIP's id order: the
    printable Latin-1 bytes keep their own character, the others map to U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    table = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merge lines) of the CLIP text tokenizer, from the BPE merges file."""
    lines = gzip.open(bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + N_MERGES]  # the first line is a version header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """A `tokenizer/` folder that `CLIPTokenizer.from_pretrained` loads (SD-1.5 pads with the end
    token, OpenCLIP-trained encoders (SD-2, SDXL's second) with "!")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_clip_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# --------------------------------------------------------------------------------------------
# Component configurations (published diffusers configs; `tiny` keeps every path at toy widths)
# --------------------------------------------------------------------------------------------
def text_config(kind: str, size: str) -> dict:
    """CLIPTextConfig kwargs: "L" (CLIP ViT-L/14 text), "H" (OpenCLIP ViT-H, 23 layers as SD-2
    ships it: the penultimate layer is the last one kept), "G" (OpenCLIP bigG, SDXL's second)."""
    common = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407 if kind == "L" else 0)
    if size == "tiny":
        return dict(common, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, hidden_act="quick_gelu" if kind == "L" else "gelu")
    return dict(common, **{
        "L": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
        "H": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu"),
        "G": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu"),
    }[kind])


def unet_config(arch: str, size: str) -> dict:
    if arch == "sd15":
        full = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                    cross_attention_dim=768, layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        tiny = dict(full, sample_size=8, block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=32,
                    layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif arch == "sd2":
        full = dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                    cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True, layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        tiny = dict(full, sample_size=8, block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=32,
                    layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif arch == "sdxl":
        full = dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True, layers_per_block=2,
                    transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        # Cross-attention 64 = 32 + 32 (the two encoders' states concatenated); added embedding 80 =
        # pooled 32 + 6 time ids x 8.
        tiny = dict(full, sample_size=8, block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=64,
                    layers_per_block=1, transformer_layers_per_block=(1, 2), addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return dict(full if size == "full" else tiny, in_channels=4, out_channels=4)


def vae_config(arch: str, size: str) -> dict:
    """SD's AutoencoderKL: 4 blocks, so images are 8x the latents (tiny: the same 4 blocks, narrow)."""
    latent = unet_config(arch, size)["sample_size"]
    channels = (128, 256, 512, 512) if size == "full" else (8, 16, 16, 16)
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2 if size == "full" else 1, norm_num_groups=32 if size == "full" else 4,
                sample_size=8 * latent, scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
                force_upcast=arch == "sdxl")


def scheduler_config(arch: str) -> dict:
    """The families' published DDIM-compatible schedules (SDXL ships EulerDiscrete: same betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction" if arch == "sd2" else "epsilon", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------
def make_teacher(arch: str, size: str, out: str | Path, dtype: str = "fp32", seed: int = 0) -> Path:
    """Write a random-weight diffusers pipeline folder of family `arch` at `size` to `out`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(arch, size))
    vae = AutoencoderKL(**vae_config(arch, size))
    scheduler = DDIMScheduler(**scheduler_config(arch))
    tok_dir = out / "_tokenizers"
    if arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        tok = load_clip_tokenizer(write_clip_tokenizer(tok_dir / "1", pad_token=EOS))
        tok_2 = load_clip_tokenizer(write_clip_tokenizer(tok_dir / "2", pad_token="!"))
        enc = CLIPTextModel(CLIPTextConfig(**text_config("L", size)))
        enc_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config("G", size)))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc_2, tokenizer=tok,
                                         tokenizer_2=tok_2, unet=unet, scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline

        kind, pad = ("L", EOS) if arch == "sd15" else ("H", "!")
        tok = load_clip_tokenizer(write_clip_tokenizer(tok_dir / "1", pad_token=pad))
        enc = CLIPTextModel(CLIPTextConfig(**text_config(kind, size)))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype != "fp32":  # stored as published folders are; the loaders cast as a run needs
        pipe.to(dtype=DTYPES[dtype])
    pipe.save_pretrained(out, safe_serialization=True)
    for part in sorted(tok_dir.rglob("*"), reverse=True):
        part.unlink() if part.is_file() else part.rmdir()
    tok_dir.rmdir()
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m boot_tools.fixtures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, required=True, help="architecture family")
    p.add_argument("--size", choices=SIZES, default="tiny",
                   help="tiny: toy widths, every component and conditioning path (CPU tests); full: published sizes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="storage precision of the weights (published SD folders are mostly fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} exists and is not empty")
    try:
        out = make_teacher(args.arch, args.size, args.out, args.dtype, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"{args.arch} ({args.size}, {args.dtype}, random weights) written to {out}")
    return out


if __name__ == "__main__":
    main()
