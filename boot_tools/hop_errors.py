"""Where does a trained student's BOOT loss lie, in t, in w and by caption kind?

    python -m boot_tools.hop_errors STUDENT_DIR [--n 1024] [--delta-power 1] [--guidance-range 1 6]

Draws n (caption, ε, t, w) as a training run does (captions of --split, t uniform on 1..T, w uniform on
the guidance range), and computes each sample's bootstrap loss L_BS against the student's own target, as
the loop's BootLoss would at that student (the target network is the student itself; nothing is trained).
Prints Markdown tables: per band of t and of w, the samples, the mean and median L_BS, and the share of
the total that band holds (with single- and two-object means); then how much of the total the largest 5%
of samples hold. Under a gradient clip that is always active, those shares are the shares of each step's
direction (docs/ablations.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from boot.contract import seed_noise_tensor as seed_noise
from boot.loss import BootLoss
from boot.method import NoiseSchedule, TeacherX0
from boot.pipeline import BootPipeline
from boot.samplers import TeacherSampler
from shapes_world import world

T_BANDS = (1, 21, 101, 201, 401, 601, 801)  # band starts; the last band ends at T
W_BANDS = (1.0, 2.5, 4.0, 5.0)


@torch.no_grad()
def hop_losses(student, teacher: TeacherSampler, captions: list[str], seed: int, delta_power: float,
               guidance_range: tuple[float, float], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, w, L_BS) per caption, drawn from a generator seeded by `seed`."""
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler.config)
    f = TeacherX0(teacher.unet, schedule, teacher.scheduler.config.prediction_type, teacher.time_ids)
    loss = BootLoss(delta_power=delta_power, beta=0.0)
    gen = torch.Generator().manual_seed(seed)
    uncond = teacher.text.unconditional()[0].float()
    ts, ws, ls = [], [], []
    for lo in tqdm(range(0, len(captions), batch), desc="hops", unit="batch"):
        part = captions[lo:lo + batch]
        n = len(part)
        noise = seed_noise([seed * 1_000_003 + lo + i for i in range(n)], teacher.latent_shape, 1.0)
        t = torch.randint(1, schedule.T + 1, (n,), generator=gen)
        w = guidance_range[0] + (guidance_range[1] - guidance_range[0]) * torch.rand(n, generator=gen)
        cond = teacher.text.encode(part).float()
        out = loss(student, student, f, noise, cond, uncond.expand(n, -1, -1), w, t)
        ts.append(t), ws.append(w), ls.append(out["bootstrap"])
    return torch.cat(ts).numpy(), torch.cat(ws).numpy(), torch.cat(ls).double().numpy()


def bands(values: np.ndarray, starts, end, integer: bool = False) -> list[tuple[str, np.ndarray]]:
    """(label, mask) per band [start, next start), the last one closed at `end`; integer bands are labelled by
    their first and last value."""
    edges, last = [*starts, end], len(starts) - 1
    return [(f"{a:g}-{(b - 1 if integer and i < last else b):g}",
             (values >= a) & ((values < b) if i < last else (values <= b)))
            for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def table(title: str, rows: list[tuple[str, np.ndarray]], loss: np.ndarray, two: np.ndarray) -> str:
    lines = [f"| {title} | samples | mean L_BS | median | share of the total | single / two-object mean |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        if not m.any():
            continue
        single, pair = loss[m & ~two], loss[m & two]
        lines.append(f"| {name} | {m.sum()} | {loss[m].mean():.4f} | {np.median(loss[m]):.4f} | "
                     f"{loss[m].sum() / loss.sum():.1%} | {single.mean() if len(single) else float('nan'):.4f} / "
                     f"{pair.mean() if len(pair) else float('nan'):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.hop_errors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="student folder")
    p.add_argument("--teacher", default="pretrained/shapes-teacher", help="teacher folder")
    p.add_argument("--n", type=int, default=1024, help="samples (default 1024)")
    p.add_argument("--split", default="train", choices=world.SPLITS, help="caption split (default train)")
    p.add_argument("--seed", type=int, default=5, help="draws of captions, noise, t and w (default 5)")
    p.add_argument("--delta-power", type=float, default=1.0,
                   help="p of the hops' c_p/δ^p weight (the quick preset's 1; the paper's 2)")
    p.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 6.0), metavar=("MIN", "MAX"),
                   help="w drawn uniformly on it (default 1 6)")
    p.add_argument("--batch", type=int, default=64, help="samples per forward (default 64)")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or not 0 < args.guidance_range[0] <= args.guidance_range[1]:
        p.error("--n and --batch must be >= 1 and the guidance range 0 < MIN <= MAX")
    student = BootPipeline.from_pretrained(args.student).generator.student
    teacher = TeacherSampler(args.teacher, 50)
    if teacher.time_ids is not None:
        p.error("an SDXL-family teacher (pooled text conditioning) is not supported here")
    captions = world.sample_captions(args.n, args.seed, args.split)
    two = np.array([len(world.parse(c).objects) == 2 for c in captions])
    t, w, loss = hop_losses(student, teacher, captions, args.seed, args.delta_power, tuple(args.guidance_range),
                            args.batch)
    T = NoiseSchedule.from_scheduler_config(teacher.scheduler.config).T
    print(table("t", bands(t, T_BANDS, T, integer=True), loss, two))
    print()
    print(table("w", bands(w, W_BANDS, args.guidance_range[1]), loss, two))
    print()
    top = np.sort(loss)[::-1][:max(1, len(loss) // 20)]
    print(f"{len(loss)} samples: median L_BS {np.median(loss):.4f}, mean {loss.mean():.4f}, largest {loss.max():.3f}; "
          f"the largest 5% hold {top.sum() / loss.sum():.1%} of the total")


if __name__ == "__main__":
    main()
