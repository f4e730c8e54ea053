"""What a trained tiny decoder measures and writes (distill.tiny_decoder): PSNR and decoder timing against
the full decoder, the hardware, the sample grid and loss plot, the AutoencoderTiny folder with
tiny_decoder.json, and the judge's accuracy with each decoder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from boot.decoders import TINY_FORMAT, TINY_META, check_fits, load_tiny_decoder
from distill.tiny_decoder.train import FIRST_SEED, HELD_OUT_SEED, Recipe, full_decode, tiny_decode, to_uint8


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
# tiny_decoder.json
# --------------------------------------------------------------------------------------------
def metadata(recipe: Recipe, pipe, tiny, psnr: list[float], timing: dict, pool_s: float, train_s: float) -> dict:
    """tiny_decoder.json: what made the tiny decoder (student, latents, targets, recipe, losses), what it fits
    (latent channels, scaling factor) and what it measured on this machine."""
    params = {"tiny_decoder": sum(p.numel() for p in tiny.decoder.parameters()),
              "full_decoder": sum(p.numel() for p in pipe.vae.decoder.parameters())
              + sum(p.numel() for p in pipe.vae.post_quant_conv.parameters())}
    return {
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
