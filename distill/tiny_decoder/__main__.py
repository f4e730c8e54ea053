"""`python -m distill.tiny_decoder`: the command line (what it does: distill/tiny_decoder/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import distill.tiny_decoder as package
from boot.decoders import TINY_META, DecoderMismatch, load_tiny_decoder
from distill.tiny_decoder import report
from distill.tiny_decoder.train import (
    FIRST_SEED,
    HELD_OUT_SEED,
    SOURCES,
    Recipe,
    build_tiny,
    full_decode,
    load_pool,
    tiny_decode,
    train,
)


def _blocks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block counts, e.g. 2,2,1, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"block counts must be >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Recipe(student="")
    p = argparse.ArgumentParser(prog="python -m distill.tiny_decoder", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--student", type=Path, required=True, help="student folder whose VAE decoder is distilled (and whose latents)")
    a("--out", type=Path, default=None, help="tiny decoder folder to write (default students/<student>-tiny-decoder)")
    a("--work", type=Path, default=None,
      help="latent pools, checkpoints, loss.jsonl (default runs/tiny-decoder/<name>)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --work")
    a("--check", type=Path, default=None, metavar="FOLDER",
      help="only check that the tiny decoder FOLDER fits --student (exit 0), or say why not (exit 2)")
    a("--source", choices=SOURCES, default=d.source, help=f"who makes the training latents (default {d.source})")
    a("--teacher", type=Path, default=None, help="teacher folder for --source teacher|both (default: the student's)")
    a("--teacher-steps", type=int, default=d.teacher_steps, help=f"teacher DDIM steps (default {d.teacher_steps})")
    a("--channels", type=int, default=d.channels, help=f"width of every decoder level (default {d.channels})")
    a("--blocks", type=_blocks, default=d.blocks,
      help=f"AutoencoderTinyBlocks per decoder level, one per VAE level (default {','.join(map(str, d.blocks))})")
    a("--pool", type=int, default=d.pool, help=f"training latents (default {d.pool})")
    a("--held-out", type=int, default=d.held_out, help=f"held-out latents for PSNR (default {d.held_out})")
    a("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    a("--batch-size", type=int, default=d.batch_size, help=f"latents per step (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    a("--l1", type=float, default=d.l1, help=f"weight of the L1 loss (default {d.l1})")
    a("--mse", type=float, default=d.mse, help=f"weight of the MSE loss (default {d.mse})")
    a("--seed", type=int, default=d.seed, help=f"seed of captions, guidance draws and batches (default {d.seed})")
    a("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    a("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long; --resume goes on")
    a("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default)")
    a("--eval-n", type=int, default=0, help="also judge the student with each decoder on this many eval captions")
    a("--timing-rounds", type=int, default=40, help="rounds of the interleaved decoder timing (default 40)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from boot.pipeline import BootPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = BootPipeline.from_pretrained(args.student)
    if pipe.vae is None:
        raise DecoderMismatch(f"{args.student} has no VAE (a pixel-space student): there is no decoder to distill")
    if args.check is not None:
        load_tiny_decoder(args.check, pipe.vae.config)
        print(f"{args.check} fits {args.student}: latent_channels {pipe.vae.config.latent_channels}, "
              f"scaling_factor {pipe.vae.config.scaling_factor}")
        return 0
    name = Path(args.student).name
    out = args.out or Path("students") / f"{name}-tiny-decoder"
    work = args.work or Path("runs/tiny-decoder") / name
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or (pipe.meta.get("teacher") if args.source != "student" else None)
    recipe = Recipe(student=str(args.student), teacher=str(teacher) if teacher else None, source=args.source,
                    teacher_steps=args.teacher_steps, channels=args.channels, blocks=tuple(args.blocks),
                    pool=args.pool, held_out=args.held_out, steps=args.steps, batch_size=args.batch_size,
                    lr=args.lr, warmup=args.warmup, l1=args.l1, mse=args.mse, seed=args.seed)
    if recipe.source != "student" and not recipe.teacher:
        raise ValueError(f"--source {recipe.source} needs --teacher (the student's boot.json names none)")
    tiny = build_tiny(pipe.vae.config, recipe.channels, recipe.blocks)
    t0 = time.perf_counter()
    pool = load_pool(pipe, recipe, "train", recipe.pool, FIRST_SEED, work)
    held = load_pool(pipe, recipe, "eval", recipe.held_out, HELD_OUT_SEED, work)
    pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reached = train(tiny, pool, recipe, work, args.resume, args.checkpoint_every, pipe.vae.config, args.max_minutes)
    train_s = time.perf_counter() - t0
    if reached < recipe.steps:
        return 0  # stopped by --max-minutes: the checkpoint is in --work
    full_images = report.decode_images(lambda z: full_decode(pipe.vae, z), held["latents"])
    tiny_images = report.decode_images(lambda z: tiny_decode(tiny, z), held["latents"])
    psnr = report.psnr_db(full_images, tiny_images)
    timing = report.time_decoders(pipe.vae, tiny, held["latents"], rounds=args.timing_rounds)
    meta = report.metadata(recipe, pipe, tiny, psnr, timing, pool_s, train_s)
    if args.eval_n:
        meta["measured"]["judge"] = None  # filled below, once the folder exists to be loaded
    report.write_folder(tiny, out, meta, pipe.vae.config)
    report.sample_grid(full_images, tiny_images, out / "samples.png")
    report.loss_plot(work, out / "loss.png")
    if args.eval_n:
        meta["measured"]["judge"] = report.judge(str(args.student), out, args.eval_n, out / "eval")
        (out / TINY_META).write_text(json.dumps(meta, indent=1) + "\n")
    m = meta["measured"]
    print(f"[tiny_decoder] wrote {out}: PSNR vs full {m['psnr_tiny_vs_full_db']['mean']:.2f} dB (held-out mean); "
          f"decoder p50 ms full/tiny: PyTorch {timing['full_torch']['p50_ms']:.2f}/"
          f"{timing['tiny_torch']['p50_ms']:.2f}, "
          f"ONNX Runtime {timing['full_onnxruntime']['p50_ms']:.2f}/{timing['tiny_onnxruntime']['p50_ms']:.2f}")
    if m.get("judge"):
        j = m["judge"]
        print(f"[tiny_decoder] judge accuracy on {j['captions']} eval captions: full {100 * j['accuracy_full']:.1f}%, "
              f"tiny {100 * j['accuracy_tiny']:.1f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DecoderMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
