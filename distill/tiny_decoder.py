"""A tiny decoder distilled data-free: a diffusers AutoencoderTiny (TAESD's architecture) whose decoder
learns a student's full VAE decoder on latents the student (or its teacher) makes from prompts and noise.

    python -m distill.tiny_decoder --student pretrained/shapes-boot --out students/shapes-tiny-decoder
    python -m distill.tiny_decoder --student pretrained/shapes-boot --out ... --resume        # go on
    python -m distill.tiny_decoder --student ... --out ... --source teacher --teacher pretrained/shapes-teacher
    python -m distill.tiny_decoder --student ... --out ... --eval-n 300     # + judge accuracy, full vs tiny
    python -m distill.tiny_decoder --student ... --check students/shapes-tiny-decoder    # does it fit?

No image from outside: the training pairs are (latents, the full decoder's output on them). Latents
(--source): `student`, the student's one step from seeded noise at a guidance scale drawn from its range
for captions of the shapes grammar's train split: exactly what the served decoder gets; `teacher`, the
teacher's DDIM at --teacher-steps from the same; `both`, half each. The pool is made once into --work
(keyed by everything it depends on); held-out latents come the same way from the eval split's captions
and other seeds. Loss: --l1 x L1 + --mse x MSE between the tiny decoder's output and the full decoder's
output clamped to the image range [-1, 1] (the postprocess clamps anyway); AdamW, cosine learning rate.

The tiny decoder is sized to the student's VAE: the same latent channels, scaling factor and upsampling
(one decoder level per VAE level), --channels wide, --blocks AutoencoderTinyBlocks per level. It decodes
`latents / scaling_factor` as the full VAE does, so plain diffusers swaps it in:
`pipe.vae = AutoencoderTiny.from_pretrained(OUT)`. The encoder half of the folder is AutoencoderTiny's,
minimal and untrained (tiny_decoder.json says so): only decoding is distilled.

--out receives the AutoencoderTiny folder (config.json, diffusion_pytorch_model.safetensors),
tiny_decoder.json (format, student, teacher, latent source, steps, losses, sizes, the measurements),
samples.png (held-out latents: full decoder | tiny decoder | 4x their difference) and loss.png.
--work holds the latent pools, checkpoints (atomic; --resume continues from the newest, and a resumed run
draws the same batches as an uninterrupted one) and loss.jsonl.

Measured after training (into tiny_decoder.json): PSNR of the tiny decoder's uint8 images against the full
decoder's on the held-out latents, and decoder ms per image at batch 1, full vs tiny, in PyTorch and in
ONNX Runtime (interleaved). --eval-n N also judges the student's images with each decoder on N eval
captions (distill.evaluate's judge and seeds) into --out/eval/.

A tiny decoder whose latent channels or scaling factor differ from the student's is refused in one line
(exit 2), naming both values: when it is written and when it is loaded (--resume, --check, --eval-n).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from boot import checkpoint
from boot.decoders import TINY_FORMAT, TINY_META, DecoderMismatch, check_fits, load_tiny_decoder

SOURCES = ("student", "teacher", "both")
FIRST_SEED = 3_000_000  # noise seeds of the training pool; the held-out pool's start at HELD_OUT_SEED
HELD_OUT_SEED = 4_000_000


@dataclass
class Recipe:
    """Everything a run depends on (stored in tiny_decoder.json and every checkpoint)."""

    student: str
    teacher: str | None = None
    source: str = "student"
    teacher_steps: int = 8
    channels: int = 16
    blocks: tuple[int, ...] = (2, 2, 1)
    pool: int = 4096
    held_out: int = 256
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    l1: float = 1.0
    mse: float = 1.0
    seed: int = 0


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def build_tiny(vae_config, channels: int, blocks: tuple[int, ...]):
    """An AutoencoderTiny reading the latents of a VAE with `vae_config`: its latent channels, scaling and
    shift factor, one decoder level per VAE level (so the same upsampling), `blocks[i]` AutoencoderTinyBlocks
    of `channels` at level i. The encoder is the smallest AutoencoderTiny allows (not trained here)."""
    from diffusers import AutoencoderTiny

    levels = len(vae_config.block_out_channels)
    if len(blocks) != levels:
        raise ValueError(f"--blocks needs one count per level of the student's VAE ({levels}), got {list(blocks)}")
    return AutoencoderTiny(
        in_channels=int(vae_config.in_channels), out_channels=int(vae_config.out_channels),
        latent_channels=int(vae_config.latent_channels), scaling_factor=float(vae_config.scaling_factor),
        shift_factor=float(getattr(vae_config, "shift_factor", None) or 0.0),
        decoder_block_out_channels=(channels,) * levels, num_decoder_blocks=tuple(blocks),
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels)


def full_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The student's decoder as BootPipeline runs it: vae.decode(latents / scaling_factor), in [-1, 1]-ish."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def tiny_decode(tiny, latents: torch.Tensor) -> torch.Tensor:
    return tiny.decode(latents / tiny.config.scaling_factor).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output -> (B, H, W, 3) uint8: diffusers' postprocess (boot.contract.to_uint8)."""
    from boot.contract import to_uint8 as contract_uint8

    return contract_uint8(x.detach().cpu())


# --------------------------------------------------------------------------------------------
# Latent pools
# --------------------------------------------------------------------------------------------
def _pool_key(recipe: Recipe, split: str, n: int, first_seed: int) -> str:
    from distill.selection import unet_sha256

    parts = {"student": recipe.student, "student_unet": unet_sha256(recipe.student), "source": recipe.source,
             "teacher": recipe.teacher, "teacher_steps": recipe.teacher_steps, "split": split, "n": n,
             "first_seed": first_seed, "seed": recipe.seed}
    if recipe.source != "student" and recipe.teacher:
        parts["teacher_unet"] = unet_sha256(recipe.teacher)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def make_latents(pipe, recipe: Recipe, split: str, n: int, first_seed: int, chunk: int = 64) -> tuple:
    """n latents and their captions: captions of `split`, seeds first_seed + i, one guidance scale per chunk
    drawn uniformly from the student's range; the student's one step, or the teacher's DDIM (--source)."""
    from shapes_world import world

    captions = world.sample_captions(n, recipe.seed + 17, split)
    rng = np.random.default_rng([recipe.seed, first_seed])
    lo, hi = pipe.guidance_range
    sampler = None
    if recipe.source != "student":
        from boot.samplers import TeacherSampler

        sampler = TeacherSampler(recipe.teacher, recipe.teacher_steps)
    out = []
    for start in tqdm(range(0, n, chunk), desc=f"latents ({split}, {recipe.source})", leave=False):
        p = captions[start:start + chunk]
        seeds = [first_seed + i for i in range(start, start + len(p))]
        w = float(rng.uniform(lo, hi))
        use_teacher = recipe.source == "teacher" or (recipe.source == "both" and (start // chunk) % 2 == 1)
        with torch.no_grad():
            if use_teacher:
                noise = pipe.noise(seeds) * (sampler.scheduler.init_noise_sigma / pipe.init_noise_sigma)
                states, pooled = sampler.text.encode_pooled(p)
                out.append(sampler.sample_latents(states, noise, w, pooled=pooled).float())
            else:
                out.append(pipe.latents(p, seeds, w).float())
    return torch.cat(out), captions


def load_pool(pipe, recipe: Recipe, split: str, n: int, first_seed: int, work: Path) -> dict[str, torch.Tensor]:
    """{"latents", "targets"} of a pool, made once into `work` (targets: the full decoder's output clamped to
    [-1, 1], stored in fp16) and read back on later runs."""
    from safetensors.torch import load_file, save_file

    path = work / f"pool-{split}-{_pool_key(recipe, split, n, first_seed)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    latents, _ = make_latents(pipe, recipe, split, n, first_seed)
    targets = []
    with torch.no_grad():
        for start in tqdm(range(0, n, 64), desc=f"full decoder ({split})", leave=False):
            targets.append(full_decode(pipe.vae, latents[start:start + 64]).clamp(-1, 1).half())
    pool = {"latents": latents.contiguous(), "targets": torch.cat(targets).contiguous()}
    tmp = path.with_suffix(".tmp")
    save_file(pool, str(tmp))
    os.replace(tmp, path)
    return pool


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine to 5% of --lr (a function of the step only: resumable)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_rows(recipe: Recipe, step: int, n: int) -> torch.Tensor:
    from distill.batches import step_generator

    return torch.randint(0, n, (recipe.batch_size,), generator=step_generator(recipe.seed, step))


def losses(recipe: Recipe, out: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    l1 = (out - target).abs().mean()
    mse = ((out - target) ** 2).mean()
    return {"loss": recipe.l1 * l1 + recipe.mse * mse, "l1": l1, "mse": mse}


def train(tiny, pool: dict[str, torch.Tensor], recipe: Recipe, work: Path, resume: bool,
          checkpoint_every: int, student_vae_config, max_minutes: float | None = None) -> int:
    """Train tiny.decoder on the pool up to recipe.steps; returns the step reached."""
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    ckpt_dir, start = work / "checkpoints", 0
    if resume and (last := checkpoint.latest(ckpt_dir)) is not None:
        meta = json.loads((last / "meta.json").read_text())["meta"]
        check_fits(meta.get("tiny_config", {}), student_vae_config, f"checkpoint {last}")
        was = meta.get("recipe", {})
        if was.get("channels") != recipe.channels or list(was.get("blocks", [])) != list(recipe.blocks):
            raise DecoderMismatch(f"checkpoint {last} is a tiny decoder of --channels {was.get('channels')} "
                                  f"--blocks {was.get('blocks')}, not {recipe.channels} {list(recipe.blocks)}")
        start = checkpoint.load(last, {"decoder": tiny.decoder}, opt)["step"]
        print(f"[tiny_decoder] resumed from {last} (step {start})", flush=True)
    elif not resume and checkpoint.latest(ckpt_dir) is not None:
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or another --work to start afresh")
    latents, targets = pool["latents"], pool["targets"]
    meta = {"recipe": asdict(recipe), "tiny_config": dict(tiny.config)}
    log = open(work / "loss.jsonl", "a")  # noqa: SIM115 - closed below
    tiny.decoder.train()
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")
    step = start
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="tiny decoder", smoothing=0.1)
    try:
        for step in bar:
            rows = batch_rows(recipe, step, len(latents))
            lr = learning_rate(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            out = tiny_decode(tiny, latents[rows])
            parts = losses(recipe, out, targets[rows].float())
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            values = {k: float(v.detach()) for k, v in parts.items()}
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.1e}")
            if step % 10 == 0:
                log.write(json.dumps({"step": step, "lr": lr, **values}) + "\n")
            done = step + 1
            if done % checkpoint_every == 0 or done == recipe.steps or time.monotonic() > deadline:
                checkpoint.save(ckpt_dir, done, {"decoder": tiny.decoder}, opt, meta)
                log.flush()
            if time.monotonic() > deadline:
                print(f"[tiny_decoder] --max-minutes reached at step {done}; --resume continues", flush=True)
                return done
        step = recipe.steps
    finally:
        bar.close()
        log.close()
        tiny.decoder.eval()
    return max(step, start)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def psnr_db(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per-image PSNR (dB) of uint8 images, as distill.evaluate.psnr."""
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        mse = float(((x - y) ** 2).mean())
        out.append(float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse))
    return out


def decode_images(decode, latents: torch.Tensor, chunk: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([to_uint8(decode(latents[i:i + chunk])) for i in range(0, len(latents), chunk)])


def _onnx_session(module: torch.nn.Module, example: torch.Tensor):
    import io
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, input_names=["latents"], output_names=["image"],
                          dynamic_axes={"latents": {0: "batch"}, "image": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the served models
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


class _Decode(torch.nn.Module):
    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, latents):
        return self.fn(self.model, latents)


def time_decoders(vae, tiny, latents: torch.Tensor, rounds: int = 40, block: int = 10) -> dict:
    """ms per image at batch 1, full vs tiny, in PyTorch (this process's threads) and ONNX Runtime (its default
    threads, no spinning), all four interleaved in blocks so that a drift of the machine's load hits each alike."""
    x = latents[:1]
    runs = {"full_torch": lambda: full_decode(vae, x), "tiny_torch": lambda: tiny_decode(tiny, x)}
    for name, fn, model in (("full", full_decode, vae), ("tiny", tiny_decode, tiny)):
        sess = _onnx_session(_Decode(fn, model).eval(), x)
        feed = {"latents": x.numpy()}
        runs[f"{name}_onnxruntime"] = lambda sess=sess, feed=feed: sess.run(None, feed)
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            for _ in range(5):
                fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1000)
    out = {}
    for name, ms in times.items():
        q = np.percentile(ms, [25, 50, 75])
        out[name] = {"p25_ms": round(float(q[0]), 3), "p50_ms": round(float(q[1]), 3), "p75_ms": round(float(q[2]), 3),
                     "calls": len(ms)}
    out["torch_threads"] = torch.get_num_threads()
    return out


def machine() -> dict:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
            os.cpu_count(), "gpu": gpu, "load_average": [round(v, 2) for v in load] if load else None}


# --------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------
def sample_grid(full: np.ndarray, tiny: np.ndarray, path: Path, rows: int = 8, scale: int = 3) -> None:
    """Held-out latents, one per row: full decoder | tiny decoder | 4x |difference|."""
    from PIL import Image, ImageDraw

    n = min(rows, len(full))
    h, w = full.shape[1:3]
    cell_h, cell_w, head = h * scale, w * scale, 16
    sheet = Image.new("RGB", (3 * (cell_w + 4), head + n * (cell_h + 4)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(("full decoder", "tiny decoder", "4x |diff|")):
        draw.text((j * (cell_w + 4) + 2, 2), title, fill=(240, 240, 240))
    for i in range(n):
        diff = np.clip(4 * np.abs(full[i].astype(np.int16) - tiny[i].astype(np.int16)), 0, 255).astype(np.uint8)
        for j, im in enumerate((full[i], tiny[i], diff)):
            sheet.paste(Image.fromarray(im).resize((cell_w, cell_h), Image.NEAREST),
                        (j * (cell_w + 4), head + i * (cell_h + 4)))
    sheet.save(path)


def loss_plot(work: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (work / "loss.jsonl").read_text().splitlines() if line.strip()]
    last = {}
    for r in rows:  # a resumed run re-logs steps after its checkpoint: keep the last of each
        last[r["step"]] = r
    steps = sorted(last)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "l1", "mse"):
        ax.plot(steps, [last[s][key] for s in steps], label=key, lw=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="tiny decoder vs the full decoder (training pool)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_folder(tiny, out: Path, meta: dict, student_vae_config) -> None:
    """The AutoencoderTiny folder and tiny_decoder.json; refused unless it fits the student."""
    check_fits(tiny.config, student_vae_config, f"tiny decoder for {out}")
    out.mkdir(parents=True, exist_ok=True)
    tiny.save_pretrained(out, safe_serialization=True)
    (out / TINY_META).write_text(json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Judge accuracy, full vs tiny decoder
# --------------------------------------------------------------------------------------------
def judge(student: str, folder: Path, n: int, out: Path) -> dict:
    """distill.evaluate's judge on n eval captions (its seeds): the student with its full VAE decoder and with
    the tiny decoder of `folder` (the PSNR column: tiny vs full images)."""
    from boot.pipeline import BootPipeline
    from distill import evaluate
    from shapes_world import world

    full = BootPipeline.from_pretrained(student)
    tiny = BootPipeline.from_pretrained(student)
    tiny.vae = load_tiny_decoder(folder, full.vae.config)
    tiny.name = "student-1-tiny-decoder"
    captions = world.sample_captions(n, 0, "eval")
    seeds = [1_000_000 + i for i in range(n)]
    res_full, im_full = evaluate.evaluate(full, captions, seeds)
    res_tiny, im_tiny = evaluate.evaluate(tiny, captions, seeds, reference=im_full)
    evaluate.write_report([res_full, res_tiny], {full.name: im_full, tiny.name: im_tiny}, captions, out,
                          f"shapes eval split, {n} captions, seed 0: full vs tiny decoder",
                          {"student": student, "tiny_decoder": str(folder)})
    both = sum(a and b for a, b in zip(res_full.verdicts, res_tiny.verdicts))
    return {"captions": n, "accuracy_full": res_full.accuracy, "accuracy_tiny": res_tiny.accuracy,
            "both_correct": both, "full_only": sum(res_full.verdicts) - both,
            "tiny_only": sum(res_tiny.verdicts) - both,
            "psnr_tiny_vs_full_db": res_tiny.psnr_vs_reference, "report": str(out)}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
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
    p = argparse.ArgumentParser(prog="python -m distill.tiny_decoder", description=__doc__,
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
    full_images = decode_images(lambda z: full_decode(pipe.vae, z), held["latents"])
    tiny_images = decode_images(lambda z: tiny_decode(tiny, z), held["latents"])
    psnr = psnr_db(full_images, tiny_images)
    timing = time_decoders(pipe.vae, tiny, held["latents"], rounds=args.timing_rounds)
    params = {"tiny_decoder": sum(p.numel() for p in tiny.decoder.parameters()),
              "full_decoder": sum(p.numel() for p in pipe.vae.decoder.parameters())
              + sum(p.numel() for p in pipe.vae.post_quant_conv.parameters())}
    meta = {
        "format": TINY_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # the student's teacher (its lineage; the latents' maker is "latents"."source")
        "student": recipe.student, "teacher": recipe.teacher or pipe.meta.get("teacher"),
        "latents": {"source": recipe.source, "teacher_steps": recipe.teacher_steps if recipe.source != "student"
                    else None, "train": f"{recipe.pool} latents, shapes train-split captions, seeds "
                    f"{FIRST_SEED}+i, guidance uniform in the student's range per chunk of 64",
                    "held_out": f"{recipe.held_out} latents, eval-split captions, seeds {HELD_OUT_SEED}+i"},
        "targets": "the student's full VAE decoder: vae.decode(latents / scaling_factor), clamped to [-1, 1]",
        "recipe": asdict(recipe),
        "losses": {"l1": recipe.l1, "mse": recipe.mse, "optimizer": "AdamW", "schedule": "linear warm-up, cosine "
                   "to 5% of lr"},
        "latent_channels": int(pipe.vae.config.latent_channels),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "encoder": "untrained: only the decoder is distilled; encode() of this folder gives meaningless latents",
        "parameters": params,
        "measured": {
            "hardware": machine(),
            "psnr_tiny_vs_full_db": {"mean": round(float(np.mean(psnr)), 3), "median": round(float(np.median(psnr)), 3),
                                     "min": round(float(np.min(psnr)), 3), "images": len(psnr),
                                     "on": "uint8 images of the held-out latents"},
            "decoder_ms_batch1": timing,
            "seconds": {"latent_pools": round(pool_s, 1), "training_this_run": round(train_s, 1)},
        },
    }
    if args.eval_n:
        meta["measured"]["judge"] = None  # filled below, once the folder exists to be loaded
    write_folder(tiny, out, meta, pipe.vae.config)
    sample_grid(full_images, tiny_images, out / "samples.png")
    loss_plot(work, out / "loss.png")
    if args.eval_n:
        meta["measured"]["judge"] = judge(str(args.student), out, args.eval_n, out / "eval")
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
