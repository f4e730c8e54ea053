"""Where along the teacher's trajectory does a BOOT student go wrong?

    python -m boot_tools.handoff STUDENT_DIR [--n 96] [--t 999,899,799,599,399,199,99,0]

For each handoff time t: the student's signal y_t = g(ε, t, c) gives x̂_t = α_t·y_t + σ_t·ε, the
teacher finishes from x̂_t on its 50-step DDIM grid (steps at or below t), and the judge scores the
images (--split captions, eval by default; seeds 1,000,000 + i, guidance 4). t = T is the teacher alone; t = 0 is
the student's own one-step image. A drop between two times says the student's trajectory is off there.
Prints a Markdown table: handoff t, accuracy, single-object and two-object accuracy, and (with t = 0
among the times) the captions each handoff gets right and the student's own image does not, and the
reverse, with the exact sign test of the difference (the same captions and noise for every t).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from boot.contract import seed_noise_tensor as seed_noise
from boot.contract import to_uint8
from boot.pipeline import BootPipeline
from boot.samplers import TeacherSampler
from distill.compare import sign_test
from shapes_world import world
from shapes_world.judge import judge


@torch.no_grad()
def handoff_images(student, teacher: TeacherSampler, captions, seeds, t: int, w: float) -> list[Image.Image]:
    alpha, sigma = student.schedule.alpha, student.schedule.sigma
    eps = seed_noise(seeds, teacher.latent_shape, 1.0)
    states = teacher.text.encode(captions)
    n = len(captions)
    x = student(eps, torch.full((n,), t, dtype=torch.long), states, torch.full((n,), w))  # y_t
    if t > 0:
        x = teacher.sample_latents(states, alpha[t] * x + sigma[t] * eps, w, start=t)  # from x̂_t
    decoded = teacher.vae.decode(x / teacher.vae.config.scaling_factor).sample
    return [Image.fromarray(a) for a in to_uint8(decoded)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.handoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="student folder")
    p.add_argument("--teacher", default="pretrained/shapes-teacher", help="teacher folder")
    p.add_argument("--n", type=int, default=96, help="captions (default 96)")
    p.add_argument("--split", default="eval", choices=world.SPLITS,
                   help="caption split: eval (held out), seen, unseen (held-out compositions) (default eval)")
    p.add_argument("--t", default="999,899,799,599,399,199,99,0", help="handoff times")
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale (default 4)")
    args = p.parse_args(argv)
    student = BootPipeline.from_pretrained(args.student).generator.student
    teacher = TeacherSampler(args.teacher, 50)
    captions = world.sample_captions(args.n, 0, args.split)
    seeds = [1_000_000 + i for i in range(args.n)]
    two = np.array([len(world.parse(c).objects) == 2 for c in captions])
    times = [int(x) for x in args.t.split(",")]
    verdicts = {}
    for t in sorted(times, key=lambda t: t != 0):  # the student's own image first: the others are paired with it
        ok = []
        for lo in range(0, args.n, 48):
            images = handoff_images(student, teacher, captions[lo:lo + 48], seeds[lo:lo + 48], t, args.guidance)
            ok += [judge(c, im) for c, im in zip(captions[lo:lo + 48], images)]
        verdicts[t] = np.array(ok)
    own = verdicts.get(0)
    print("| handoff t | accuracy | single | two objects | vs the student's own: gains / losses, sign test p |\n"
          "|---|---|---|---|---|")
    for t in times:
        ok, paired = verdicts[t], ""
        if own is not None and t != 0:
            gains, losses = int((ok & ~own).sum()), int((own & ~ok).sum())
            paired = f"{gains} / {losses}, p = {sign_test(gains, losses):.2g}"
        print(f"| {t} | {100 * ok.mean():.1f}% | {100 * ok[~two].mean():.1f}% | {100 * ok[two].mean():.1f}% "
              f"| {paired} |")


if __name__ == "__main__":
    main()
