"""BOOT at SD-1.5 scale on one GPU: s/step, peak memory, bf16-vs-fp32 gradients, projected GPU-hours.

    python -m boot_tools.gpu_scale --out runs/gpu_scale                   # on a GPU (boot_tools/gpu/scale.sh)
    python -m boot_tools.gpu_scale --out /tmp/s --device cpu --size tiny --batches 2 --steps 1 --cosine-batch 2

The teacher is the full SD-1.5 architecture with random weights (boot_tools.fixtures, stored in fp16 as
published folders are), 512² images (4x64x64 latents), CFG on. A measured step is distill.run's: BOOT
loss (target student at t, the teacher's CFG call at t and at T, the online student's s and T branches),
backward with gradient checkpointing, gradient clipping, AdamW, EMA update. Random weights do not
change the cost of a step. Writes scale.json with every number and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from boot.loss import BootLoss
from boot.method import NoiseSchedule, TeacherX0
from boot_tools import fixtures
from distill import loading, loop, precision

# Published training costs of one-step/few-step SD-1.5 distillations, in A100-hours.
PUBLISHED = {"LCM (SD-1.5), Luo et al. 2023": 32, "DMD2 (SD-1.5), Yin et al. 2024": 1600}
STEPS_PROJECTED = 10_000
PROMPT = "a photograph of an astronaut riding a horse"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def batch(teacher: loading.Teacher, n: int, dev: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = teacher.text.encode([PROMPT]).float().to(dev).expand(n, -1, -1)
    uncond = teacher.text.encode([""]).float().to(dev).expand(n, -1, -1)
    noise = torch.randn((n, *teacher.latent_shape), generator=g).to(dev)
    t = torch.randint(1, 1000, (n,), generator=g).to(dev)
    w = (1.0 + 7.0 * torch.rand(n, generator=g)).to(dev)
    return noise, cond, uncond, w, t


def setup(folder: Path, amp: str, dev: torch.device, checkpointing: bool):
    teacher = loading.load_teacher(folder, precision.teacher_dtype("auto", amp))
    teacher.text.text_encoder.to(dev)
    sched = NoiseSchedule.from_scheduler_config(teacher.scheduler_config).to(dev)
    teacher_x0 = TeacherX0(teacher.unet.to(dev), sched, teacher.prediction_type)
    student = loading.build_student(teacher, sched).to(dev)
    if checkpointing:
        student.unet.enable_gradient_checkpointing()
    return teacher, teacher_x0, student


def time_steps(folder: Path, n: int, steps: int, dev: torch.device, amp: str = "bf16") -> dict:
    """Warm-up step, then `steps` timed distill.run steps at batch n (bf16, checkpointing, EMA on the GPU)."""
    teacher, teacher_x0, student = setup(folder, amp, dev, checkpointing=True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.unet.parameters(), lr=1e-5, weight_decay=0.0)
    loss_fn = BootLoss(delta_steps=20)
    noise, cond, uncond, w, t = batch(teacher, n, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        with precision.autocast(dev, amp):
            loss = loss_fn(student, student, teacher_x0, noise, cond, uncond, w, t)["loss"].mean()
        loop.optimizer_step(loss, opt, None, student.unet, 1e-5, 1.0)
        loop.update_ema(ema.unet, student.unet, 0.999, i)
        sync(dev)
        times.append(time.perf_counter() - t0)
        print(f"  batch {n} step {i}: {times[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
    s_step = sum(times[1:]) / steps
    return {"batch": n, "s_per_step": round(s_step, 3), "peak_memory_gb": peak_gb(dev), "warmup_s": round(times[0], 2),
            "loss_finite": bool(torch.isfinite(loss).item()),
            "projected_hours_10k_steps": round(s_step * STEPS_PROJECTED / 3600, 2)}


def gradient_cosine(folder: Path, n: int, dev: torch.device) -> dict:
    """The same student weights, batch and teacher: gradients of the BOOT loss under bf16 (bf16 teacher)
    and fp32 (fp32 teacher), compared by cosine and relative norm."""
    grads, losses = {}, {}
    for amp in ("no", "bf16"):
        teacher, teacher_x0, student = setup(folder, amp, dev, checkpointing=True)
        noise, cond, uncond, w, t = batch(teacher, n, dev, seed=1)
        with precision.autocast(dev, amp):
            loss = BootLoss(delta_steps=20)(student, student, teacher_x0, noise, cond, uncond, w, t)["loss"].mean()
        loss.backward()
        grads[amp] = torch.cat([p.grad.double().flatten() for p in student.unet.parameters()]).cpu()
        losses[amp] = loss.item()
        del teacher, teacher_x0, student
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    a, b = grads["no"], grads["bf16"]
    return {"batch": n, "cosine": round(float(a @ b / (a.norm() * b.norm())), 6),
            "relative_norm_difference": round(float((a - b).norm() / a.norm()), 6),
            "loss_fp32": losses["no"], "loss_bf16": losses["bf16"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m boot_tools.gpu_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for scale.json")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: a smoke test of the script)")
    p.add_argument("--size", choices=fixtures.SIZES, default="full", help="SD-1.5 fixture size")
    p.add_argument("--teacher", type=Path, default=None, help="an SD-1.5 folder (default: a fixture built here)")
    p.add_argument("--batches", default="16,32,64", help="batch sizes timed, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch size, after one warm-up step")
    p.add_argument("--cosine-batch", type=int, default=8, help="batch of the bf16-vs-fp32 gradient comparison")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as distill.run does
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = args.teacher or fixtures.make_teacher("sd15", args.size, args.out / "sd15-teacher", dtype="fp16")
    print(f"teacher {folder} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "teacher": f"sd15 {args.size} (random weights, stored fp16)",
              "recipe": "bf16 autocast, bf16 teacher, gradient checkpointing, AdamW, EMA on the device, CFG, "
                        "delta 20, beta 1", "steps_projected": STEPS_PROJECTED,
              "published_a100_hours": PUBLISHED, "runs": []}
    for n in (int(v) for v in args.batches.split(",")):
        try:
            result["runs"].append(time_steps(folder, n, args.steps, dev))
        except torch.OutOfMemoryError as err:
            result["runs"].append({"batch": n, "error": f"out of memory: {str(err).splitlines()[0]}"})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(result["runs"][-1]), flush=True)
    result["gradient_cosine"] = gradient_cosine(folder, args.cosine_batch, dev)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
