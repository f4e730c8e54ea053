"""Choosing a student without a judge: same-noise agreement with the teacher's own samples.

    python -m distill.selection --student DIR --guidance 1,1.5,2,...,6 --n 200   # the recommended guidance

A one-step student g(ε, 0, c, w) is trained to land where the teacher's sampler lands from the same
noise ε, so how close it gets is a measure any teacher provides, for any prompt: the rule "psnr"
scores a student by the mean PSNR (dB) of its images against the teacher's k-step DDIM images
(boot.samplers.TeacherSampler) on fixed prompts and seeds,

    PSNR(x, x̂) = 10·log10(255² / mean((x − x̂)²)),  x = D(g(ε_i, 0, c_i, w)),  x̂ = D(DDIM_k(ε_i, c_i, w_T)),

and picks the highest. The rule "judge" scores by the shapes judge's accuracy instead (the shapes
world only: it needs grammar captions and an oracle a user distilling their own teacher lacks).

Used by distill.run (--select, for --keep best) and by the guidance choice below: for each w the
student's images are compared with the teacher's at the teacher's own recommended guidance w_T (what
a user of the teacher would have got), and the w whose images are closest is recommended.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from boot.cli import number_list

RULES = ("psnr", "judge")
METRIC = {"psnr": "psnr_vs_teacher", "judge": "accuracy"}  # the record key each rule maximises
PSNR_CAP = 99.0  # dB given to an image equal to its reference (PSNR is infinite there)


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read in chunks (an SD UNet is several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def unet_sha256(folder: str | Path) -> str:
    """Hash of a diffusers model folder's UNet weights (teacher or student folder)."""
    return file_sha256(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def mean_psnr(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Mean over images of PSNR (dB) against their same-noise references, each capped at PSNR_CAP."""
    from distill.evaluate import psnr

    if len(images) != len(reference) or not images:
        raise ValueError(f"need as many images as references (got {len(images)} and {len(reference)})")
    return float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(images, reference)]))


def validation_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """n prompts of a prompt file for validation: distinct ones in a fixed shuffled order (seed), repeated
    when the file has fewer than n."""
    distinct = list(dict.fromkeys(prompts))
    order = np.random.default_rng([int(seed), 0x5E1]).permutation(len(distinct))
    return [distinct[order[i % len(distinct)]] for i in range(n)]


class TeacherReference:
    """The teacher's k-step DDIM images for fixed (prompt, seed) pairs at one guidance scale, computed
    once and cached in `cache` (keyed on the teacher UNet's hash, the scheduler config, k, w, the
    prompts and the seeds), so a resumed run and every validation compare against the same images."""

    def __init__(self, teacher: str | Path, steps: int, cache: Path):
        self.teacher, self.steps, self.cache = Path(teacher), steps, cache

    def key(self, prompts: list[str], seeds: list[int], w: float) -> str:
        scheduler = json.loads((self.teacher / "scheduler" / "scheduler_config.json").read_text())
        record = {"unet_sha256": unet_sha256(self.teacher), "scheduler": scheduler, "steps": self.steps,
                  "guidance_scale": float(w), "prompts": prompts, "seeds": [int(s) for s in seeds]}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def images(self, prompts: list[str], seeds: list[int], w: float) -> list[Image.Image]:
        from safetensors.numpy import load_file, save_file

        key = self.key(prompts, seeds, w)
        if self.cache.is_file():
            from safetensors import safe_open

            with safe_open(self.cache, "np") as f:
                if (f.metadata() or {}).get("key") == key:
                    return [Image.fromarray(a) for a in load_file(self.cache)["images"]]
        from distill.evaluate import TeacherSampler

        images = TeacherSampler(self.teacher, self.steps, w)(prompts, seeds, w)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        save_file({"images": np.stack([np.asarray(im.convert("RGB")) for im in images])}, tmp, metadata={"key": key})
        os.replace(tmp, self.cache)
        return images


def judge_scores(captions: list[str], images: list[Image.Image]) -> dict:
    """Shapes-judge accuracy overall and on single- and two-object captions."""
    from shapes_world.judge import judge
    from shapes_world.world import parse

    ok = np.array([judge(c, im) for c, im in zip(captions, images)])
    two = np.array([len(parse(c).objects) == 2 for c in captions])
    return {"accuracy": float(ok.mean()),
            "single": float(ok[~two].mean()) if (~two).any() else None,
            "two": float(ok[two].mean()) if two.any() else None}


def is_grammar(prompts: list[str]) -> bool:
    """True when every prompt parses in the shapes grammar (the judge can score them)."""
    from shapes_world.world import parse

    try:
        for p in prompts:
            parse(p)
    except ValueError:
        return False
    return True


def pick(records: list[dict], rule: str) -> dict | None:
    """The record the rule chooses: the highest METRIC[rule], the first of equal ones."""
    key = METRIC[rule]
    scored = [r for r in records if r.get(key) is not None]
    return max(scored, key=lambda r: r[key]) if scored else None


# --------------------------------------------------------------------------------------------
# The recommended guidance
# --------------------------------------------------------------------------------------------
def guidance_table(student, reference: list[Image.Image] | None, prompts: list[str], seeds: list[int],
                   scales: list[float], judged: bool, batch: int = 64) -> list[dict]:
    """One record per w: the student's PSNR against the reference images (None without them) and, `judged`,
    the judge's accuracy."""
    rows = []
    for w in scales:
        images = [im for lo in range(0, len(prompts), batch)
                  for im in student(prompts[lo:lo + batch], seeds[lo:lo + batch], w)]
        row = {"guidance_scale": w, METRIC["psnr"]: mean_psnr(images, reference) if reference is not None else None}
        if judged:
            row.update(judge_scores(prompts, images))
        rows.append(row)
        print(f"w = {w:g}: " + ", ".join(
            ([f"PSNR vs teacher {row[METRIC['psnr']]:.2f} dB"] if reference is not None else [])
            + ([f"judge accuracy {100 * row['accuracy']:.1f}%"] if judged else [])), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    from boot.folders import STUDENT_META, read_meta
    from distill import config, loading, student_folder
    from distill.evaluate import StudentGenerator
    from shapes_world import world

    p = argparse.ArgumentParser(prog="python -m distill.selection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, required=True, help="student folder (boot.json, unet/, ...)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher folder (default: the one the student's boot.json names)")
    p.add_argument("--guidance", type=number_list(), required=True, metavar="W1,W2,...",
                   help="guidance scales to score")
    p.add_argument("--prompts", type=Path, default=None,
                   help="UTF-8 file, one prompt per line (default: --n captions of the shapes grammar's --split)")
    p.add_argument("--split", choices=world.SPLITS, default="eval", help="grammar split (default eval)")
    p.add_argument("--n", type=int, default=200, help="prompts scored (default 200)")
    p.add_argument("--seed", type=int, default=11,
                   help="caption seed; noise seeds are 1,000,000 + i (default 11: neither the eval table's 0 nor "
                        "the fresh captions' 21 and 31)")
    p.add_argument("--teacher-steps", type=int, default=config.REFERENCE_STEPS,
                   help=f"DDIM steps of the teacher's reference images (default {config.REFERENCE_STEPS})")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="guidance of the teacher's reference images (default: the teacher's recommended one)")
    p.add_argument("--rule", choices=RULES, default="psnr",
                   help="psnr: closest to the teacher's images; judge: the shapes judge's accuracy (grammar "
                        "captions only) (default psnr)")
    p.add_argument("--out", type=Path, default=Path("runs/selection"),
                   help="guidance.json and the cached teacher images (default runs/selection)")
    p.add_argument("--write", action="store_true",
                   help="store the chosen w in the student's boot.json (guidance_scale, guidance_selection)")
    args = p.parse_args(argv)
    if args.n < 1 or args.teacher_steps < 1:
        p.error("--n and --teacher-steps must be >= 1")
    try:
        meta = json.loads((args.student / STUDENT_META).read_text())
        teacher = args.teacher or Path(meta["teacher"])
        lo, hi = meta.get("guidance_range", [min(args.guidance), max(args.guidance)])
        if not all(lo <= w <= hi for w in args.guidance):
            raise ValueError(f"--guidance must lie in the student's trained range [{lo}, {hi}]")
        if args.prompts:
            prompts = validation_prompts(loading.read_prompts(args.prompts), args.n, args.seed)
        else:
            prompts = world.sample_captions(args.n, args.seed, args.split)
        w_teacher = args.teacher_guidance or float(read_meta(teacher).get("guidance_scale", 7.5))
    except (OSError, ValueError, KeyError) as err:
        p.error(f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else str(err))
    judged = is_grammar(prompts)
    if args.rule == "judge" and not judged:
        p.error("--rule judge needs shapes-grammar prompts")
    seeds = [1_000_000 + i for i in range(args.n)]
    cache = args.out / f"teacher-{args.teacher_steps}-images.safetensors"
    reference = TeacherReference(teacher, args.teacher_steps, cache).images(prompts, seeds, w_teacher)
    rows = guidance_table(StudentGenerator(args.student), reference, prompts, seeds, args.guidance, judged)
    choice = {rule: pick(rows, rule)["guidance_scale"] for rule in RULES if rule == "psnr" or judged}
    report = {"student": str(args.student), "teacher": str(teacher), "teacher_steps": args.teacher_steps,
              "teacher_guidance_scale": w_teacher, "prompts": str(args.prompts) if args.prompts else
              {"split": args.split, "seed": args.seed}, "n": args.n, "noise_seeds": "1,000,000 + i",
              "rule": args.rule, "chosen": choice[args.rule], "choice_by_rule": choice, "scales": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guidance.json").write_text(json.dumps(report, indent=1))
    print(f"rule {args.rule}: w = {choice[args.rule]:g}" + "".join(
        f" (rule {r}: w = {w:g})" for r, w in choice.items() if r != args.rule) + f" -> {args.out / 'guidance.json'}")
    if args.write:
        best = pick(rows, args.rule)
        student_folder.update_student_meta(args.student, guidance_scale=best["guidance_scale"], guidance_selection={
            "rule": args.rule, "metric": METRIC[args.rule], "value": best[METRIC[args.rule]],
            **{k: report[k] for k in ("teacher_steps", "teacher_guidance_scale", "prompts", "n")}})
    return report


if __name__ == "__main__":
    main()
