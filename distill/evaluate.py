"""Judge-based evaluation of any generator on the shapes world (teacher at k steps or a student).

    python -m distill.evaluate --teacher pretrained/shapes-teacher --steps 1,2,4,8,25,50
    python -m distill.evaluate --student pretrained/shapes-boot --steps 1,2,4,8,50
    python -m distill.evaluate --student pretrained/shapes-boot --guidance-sweep 1,2,3,4,5,6 --n 100
    python -m distill.evaluate --url 127.0.0.1:8000 --student pretrained/shapes-boot --steps 50

Writes report.json, report.md and grid.png to --out (with --url, the served model among the others).

Every generator has one signature:
    gen(prompts: list[str], seeds: list[int], guidance_scale: float | None = None) -> list[PIL.Image]
plus `name` and `nfe` (network evaluations per image, a CFG pair counted as 2), so the evaluator,
the benchmark and the demo treat teacher-k-steps and the one-step student alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from boot.cli import Parser, number_list
from boot.contract import seed_noise_tensor as seed_noise  # noqa: F401  (evaluation's name for it)
from boot.contract import to_uint8  # noqa: F401
from boot.samplers import TeacherSampler  # noqa: F401  (re-exported)
from shapes_world import world
from shapes_world.judge import judge_detailed

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


class Generator(Protocol):
    name: str
    nfe: int

    def __call__(self, prompts: list[str], seeds: list[int],
                 guidance_scale: float | None = None) -> list[Image.Image]: ...


class StudentGenerator:
    """A BOOT student folder as a Generator (one network evaluation per image)."""

    def __init__(self, folder: str | Path):
        from boot.pipeline import BootPipeline

        self.pipe = BootPipeline.from_pretrained(folder)
        self.name, self.nfe = "student-1", 1

    def __call__(self, prompts, seeds, guidance_scale=None):
        return self.pipe(prompts, seeds, guidance_scale)


class ServedGenerator:
    """The model behind a Triton server (boot_serve.client) as a Generator: what users get."""

    def __init__(self, url: str, protocol: str = "http"):
        from boot_serve.client import Client

        self.client = Client(url, protocol, concurrency=8)
        self.client.check()
        self.name, self.nfe = "served-1", 1

    def __call__(self, prompts, seeds, guidance_scale=None):
        return self.client.generate_many(prompts, seeds, guidance_scale)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    nfe: int
    accuracy: float
    single: float
    two: float
    attributes: dict[str, float]
    seconds_per_image: float
    psnr_vs_reference: float | None = None
    n: int = 0
    verdicts: list[bool] = field(default_factory=list, repr=False)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def evaluate(gen: Generator, captions: list[str], seeds: list[int], guidance_scale: float | None = None,
             reference: list[Image.Image] | None = None, batch_size: int = 64,
             ) -> tuple[Result, list[Image.Image]]:
    """Judge `gen` on (caption, seed) pairs; PSNR against `reference` images if given."""
    images: list[Image.Image] = []
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(captions), batch_size), desc=gen.name, leave=False):
        images += gen(captions[lo:lo + batch_size], seeds[lo:lo + batch_size], guidance_scale)
    seconds = (time.perf_counter() - t0) / max(len(captions), 1)
    verdicts = [judge_detailed(c, im) for c, im in zip(captions, images)]
    ok = [v.ok for v in verdicts]
    two = [len(world.parse(c).objects) == 2 for c in captions]
    attrs = {}
    for a in ATTRIBUTES:
        vals = [v.attributes[a] for v in verdicts if a in v.attributes]
        if vals:
            attrs[a] = float(np.mean(vals))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    result = Result(
        name=gen.name, nfe=gen.nfe, accuracy=mean(ok),
        single=mean([o for o, t in zip(ok, two) if not t]), two=mean([o for o, t in zip(ok, two) if t]),
        attributes=attrs, seconds_per_image=seconds, n=len(captions), verdicts=ok,
        psnr_vs_reference=(float(np.mean([psnr(a, b) for a, b in zip(images, reference)]))
                           if reference is not None else None),
    )
    return result, images


def markdown(results: list[Result], title: str) -> str:
    head = ("| generator | NFE | accuracy | single | two-object | " + " | ".join(ATTRIBUTES)
            + " | PSNR vs ref (dB) | s/image |")
    lines = [f"## {title}", "", head, "|" + "---|" * (7 + len(ATTRIBUTES))]
    for r in results:
        attrs = " | ".join(f"{100 * r.attributes[a]:.1f}" if a in r.attributes else "–" for a in ATTRIBUTES)
        ps = f"{r.psnr_vs_reference:.2f}" if r.psnr_vs_reference is not None else "–"
        lines.append(f"| {r.name} | {r.nfe} | {100 * r.accuracy:.1f} | {100 * r.single:.1f} | "
                     f"{100 * r.two:.1f} | {attrs} | {ps} | {r.seconds_per_image:.4f} |")
    return "\n".join(lines) + "\n"


def comparison_grid(columns: dict[str, list[Image.Image]], captions: list[str], rows: int = 12,
                    scale: int = 2) -> Image.Image:
    """Rows: captions; columns: generators (first column header = generator names)."""
    from PIL import ImageDraw

    names = list(columns)
    cell = world.CANVAS * scale
    label_w, head_h = 260, 18
    sheet = Image.new("RGB", (label_w + len(names) * (cell + 4), head_h + rows * (cell + 4)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for j, n in enumerate(names):
        draw.text((label_w + j * (cell + 4) + 2, 3), n, fill=(240, 240, 240))
    for i in range(min(rows, len(captions))):
        y = head_h + i * (cell + 4)
        draw.text((4, y + cell // 2 - 6), captions[i][:42], fill=(220, 220, 220))
        for j, n in enumerate(names):
            sheet.paste(columns[n][i].convert("RGB").resize((cell, cell), Image.NEAREST),
                        (label_w + j * (cell + 4), y))
    return sheet


def write_report(results: list[Result], images: dict[str, list[Image.Image]], captions: list[str],
                 out: Path, title: str, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Per caption, in order: the captions and each generator's judge verdicts (1 = correct), so two
    # reports on the same captions and seeds can be compared pair by pair, not only by their totals.
    payload = {"title": title, **(extra or {}), "results": [
        {**{k: v for k, v in r.__dict__.items() if k != "verdicts"}, "correct": [int(v) for v in r.verdicts]}
        for r in results], "captions": list(captions)}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    (out / "report.md").write_text(markdown(results, title))
    comparison_grid(images, captions).save(out / "grid.png")


def guidance_sweep(gens: list[Generator], scales: list[float], captions: list[str], seeds: list[int],
                   out: Path) -> dict:
    """Accuracy of each generator at each guidance scale (same captions and seeds throughout);
    writes guidance.json, guidance.md and guidance.png to `out`."""
    rows = {g.name: [] for g in gens}
    for w in scales:
        for g in gens:
            res, _ = evaluate(g, captions, seeds, w)
            rows[g.name].append({"guidance_scale": w, "accuracy": res.accuracy, "single": res.single,
                                 "two": res.two, **{f"attr_{k}": v for k, v in res.attributes.items()}})
            print(f"guidance {w}: {g.name} accuracy {100 * res.accuracy:.1f}%", flush=True)
    report = {"captions": len(captions), "scales": scales, "generators": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance.json").write_text(json.dumps(report, indent=1))
    head = "| generator | " + " | ".join(f"w={w:g}" for w in scales) + " |"
    lines = [f"## Judge accuracy (%) vs guidance scale, {len(captions)} eval captions", "", head,
             "|---|" + "---|" * len(scales)]
    lines += [f"| {name} | " + " | ".join(f"{100 * r['accuracy']:.1f}" for r in rs) + " |" for name, rs in rows.items()]
    (out / "guidance.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(rows, out / "guidance.png", len(captions))
    return report


def _plot_sweep(rows: dict[str, list[dict]], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in rows.items():
        ax.plot([r["guidance_scale"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=name)
    ax.set(xlabel="guidance scale w", ylabel="judge accuracy (%)", ylim=(0, 100),
           title=f"accuracy vs guidance ({n} eval captions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> Parser:
    summary, details = __doc__.split("\n\nEvery generator", 1)
    p = Parser(prog="python -m distill.evaluate", description=summary, details="Every generator" + details,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    expert = p.expert_group("protocol, seeds and reference steps")
    p.add_argument("--teacher", type=Path, default=Path("pretrained/shapes-teacher"),
                   help="teacher folder (default pretrained/shapes-teacher)")
    p.add_argument("--student", type=Path, default=None, help="student folder to evaluate (optional)")
    p.add_argument("--url", default=None,
                   help="also evaluate the model served by Triton at this host:port (boot_serve.client)")
    expert.add_argument("--protocol", choices=("http", "grpc"), default="http",
                        help="protocol for --url (default http)")
    p.add_argument("--steps", default="1,2,4,8,25,50", help="teacher DDIM step counts (default 1,2,4,8,25,50)")
    p.add_argument("--n", type=int, default=300, help="captions of --split (default 300)")
    p.add_argument("--split", choices=world.SPLITS, default="eval",
                   help="caption split: eval (the reports' captions), unseen (every caption holds a composition the "
                        "train split never does: shapes_world.world.HELD_OUT_PAIRS, HELD_OUT_RELATIONS), seen (none "
                        "does), train, all (default eval)")
    expert.add_argument("--seed", type=int, default=0, help="caption stream seed (default 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the teacher's/student's recommended one)")
    expert.add_argument("--reference-steps", type=int, default=50,
                   help="teacher steps whose images are the PSNR reference (default 50; 0 = none)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="report folder (default runs/eval)")
    p.add_argument("--guidance-sweep", type=number_list(), default=None, metavar="W1,W2,...",
                   help="instead of the step comparison: accuracy of the student (if given) and of the teacher "
                        "at --sweep-steps over these guidance scales -> guidance.{json,md,png}")
    expert.add_argument("--sweep-steps", type=int, default=50, help="teacher DDIM steps in the sweep (default 50)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.guidance_sweep is not None and (not args.guidance_sweep or args.sweep_steps < 1):
        p.error("--guidance-sweep needs at least one scale and --sweep-steps >= 1")
    student = None
    if args.student:  # loaded first: a folder that cannot be loaded is refused before anything is scored
        try:
            student = StudentGenerator(args.student)
        except (OSError, ValueError) as err:
            from boot.folders import describe_error

            print(f"error: cannot load the student from {args.student}: {describe_error(err)}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.guidance_sweep is not None:
        gens = ([student] if student else []) + [TeacherSampler(args.teacher, args.sweep_steps)]
        captions = world.sample_captions(args.n, args.seed, args.split)
        guidance_sweep(gens, args.guidance_sweep, captions, [1_000_000 + i for i in range(args.n)], args.out)
        print((args.out / "guidance.md").read_text())
        return
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if any(s < 1 for s in steps):
        p.error("--steps must all be >= 1")
    captions = world.sample_captions(args.n, args.seed, args.split)
    seeds = [1_000_000 + i for i in range(args.n)]
    results, images = [], {}
    reference = None
    if args.reference_steps:
        steps_order = [args.reference_steps] + [s for s in steps if s != args.reference_steps]
    else:
        steps_order = steps
    for k in steps_order:
        gen = TeacherSampler(args.teacher, k, args.guidance)
        res, imgs = evaluate(gen, captions, seeds, args.guidance, reference)
        if k == args.reference_steps and reference is None:
            reference = imgs
            res.psnr_vs_reference = None
            if k not in steps:
                continue
        results.append(res)
        images[gen.name] = imgs
        print(f"{gen.name}: accuracy {100 * res.accuracy:.1f}% (single {100 * res.single:.1f}%, "
              f"two {100 * res.two:.1f}%)", flush=True)
    extra = ([student] if student else []) + (
        [ServedGenerator(args.url, args.protocol)] if args.url else [])
    for gen in extra:
        res, imgs = evaluate(gen, captions, seeds, args.guidance, reference)
        results.insert(0, res)
        images = {gen.name: imgs, **images}
        print(f"{gen.name}: accuracy {100 * res.accuracy:.1f}%")
    results.sort(key=lambda r: (r.name not in ("student-1", "served-1"), r.nfe, r.name))
    title = f"shapes {args.split} split, {args.n} captions, seed {args.seed}"
    write_report(results, images, captions, args.out, title,
                 {"teacher": str(args.teacher), "student": str(args.student) if args.student else None,
                  "served": args.url, "split": args.split,
                  "guidance_scale": args.guidance})
    print((args.out / "report.md").read_text())
    print(f"report written to {args.out}/report.{{json,md}} and grid.png")


if __name__ == "__main__":
    main()
