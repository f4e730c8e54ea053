"""Student folders judged on the same captions and noise, each against the first with a two-sided sign test
on the captions the two disagree on (docs/ablations.md's paired comparisons).

    python -m distill.compare A B --n 200 --splits eval,seen,unseen --reference-split eval --out DIR
    python -m distill.compare FULL COMPACT --tiny-decoder pretrained/shapes-tiny-decoder --n 3000 \\
        --splits eval --reference-split '' --seed 41 --out DIR    # every student with both decoders

With --tiny-decoder each student is judged twice, with its own VAE decoder and with the tiny one
(`NAME+tiny`). On each split: accuracy overall / single / two-object of every generator (fractions in
compare.json), the captions only the first or only this one gets right, and the sign test; on
--reference-split also the PSNR against the teacher's 50-step DDIM images from the same noise. Writes
DIR/compare.json and DIR/compare.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from distill import config
from distill.evaluate import StudentGenerator, TeacherSampler, evaluate
from shapes_world import world


def sign_test(a_only: int, b_only: int) -> float:
    """Two-sided exact binomial sign test on the discordant pairs."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def generators(students: list[Path], tiny_decoder: Path | None) -> dict[str, StudentGenerator]:
    """name -> generator: each student (its folder name, or its path where two names clash), and with a tiny
    decoder each student again with it (refused, boot.decoders.DecoderMismatch, where it does not fit)."""
    from boot.decoders import load_tiny_decoder

    names = [s.name for s in students]
    names = names if len(set(names)) == len(names) else [str(s) for s in students]
    gens = {}
    for name, folder in zip(names, students):
        gens[name] = StudentGenerator(folder)
        if tiny_decoder is not None:
            tiny = StudentGenerator(folder)
            tiny.pipe.vae = load_tiny_decoder(tiny_decoder, tiny.pipe.vae.config)
            gens[f"{name}+tiny"] = tiny
    return gens


def compare_split(gens: dict, split: str, n: int, seed: int, guidance: float | None,
                  teacher: Path | None) -> dict:
    captions = world.sample_captions(n, seed, split)
    seeds = [config.SAMPLE_SEED0 + i for i in range(n)]
    t0 = time.time()
    reference = None
    if teacher is not None:
        _, reference = evaluate(TeacherSampler(teacher, config.REFERENCE_STEPS, guidance), captions, seeds, guidance)
    res = {name: evaluate(g, captions, seeds, guidance, reference)[0] for name, g in gens.items()}
    first = next(iter(res.values())).verdicts
    entry = {}
    for name, r in res.items():
        first_only = sum(a and not b for a, b in zip(first, r.verdicts))
        this_only = sum(b and not a for a, b in zip(first, r.verdicts))
        entry[name] = {"accuracy": r.accuracy, "single": r.single, "two": r.two,
                       "psnr_vs_teacher50": r.psnr_vs_reference, "first_only": first_only,
                       "this_only": this_only, "sign_test_p": sign_test(first_only, this_only)}
    return {"generators": entry, "seconds": round(time.time() - t0, 1)}


def markdown(report: dict) -> str:
    first = report["generators"][0]
    lines = [f"# {', '.join(report['generators'])}: {report['n']} captions per split, seed {report['seed']}", ""]
    for split, entry in report["splits"].items():
        lines += [f"## {split} split", "",
                  f"| generator | accuracy | single | two objects | PSNR vs teacher-50 (dB) | right only for {first} "
                  "| right only for this | sign test p |", "|---|---|---|---|---|---|---|---|"]
        for name, r in entry["generators"].items():
            psnr = "–" if r["psnr_vs_teacher50"] is None else f"{r['psnr_vs_teacher50']:.2f}"
            same = name == first
            lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['single']:.1f}% | {100 * r['two']:.1f}% | "
                         f"{psnr} | "
                         + ("– | – | –" if same else f"{r['first_only']} | {r['this_only']} | {r['sign_test_p']:.3g}")
                         + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distill.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", type=Path, nargs="+", help="student folders; each is tested against the first")
    p.add_argument("--tiny-decoder", type=Path, default=None,
                   help="an AutoencoderTiny folder (python -m distill.tiny_decoder): judge each student with it too")
    p.add_argument("--teacher", type=Path, default=config.DEFAULT_TEACHER)
    p.add_argument("--n", type=int, default=200, help="captions per split (default 200)")
    p.add_argument("--seed", type=int, default=0, help="caption stream seed (default 0)")
    p.add_argument("--splits", default="eval,seen,unseen", help="comma-separated (default eval,seen,unseen)")
    p.add_argument("--reference-split", default="eval", help="split whose teacher-50 images give PSNR ('' = none)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: each student's own)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    splits = args.splits.split(",")
    if unknown := sorted(set(splits) - set(world.SPLITS)):
        p.error(f"unknown split {', '.join(unknown)}; choose from {', '.join(world.SPLITS)}")
    if len(args.students) + (args.tiny_decoder is not None) < 2:
        p.error("give two students, or one with --tiny-decoder: there is nothing to compare")
    gens = generators(args.students, args.tiny_decoder)
    report = {"generators": list(gens), "students": [str(s) for s in args.students],
              "tiny_decoder": str(args.tiny_decoder) if args.tiny_decoder else None,
              "n": args.n, "seed": args.seed, "splits": {}}
    for split in splits:
        teacher = args.teacher if split == args.reference_split else None
        report["splits"][split] = compare_split(gens, split, args.n, args.seed, args.guidance, teacher)
        print(split, json.dumps(report["splits"][split]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))
    (args.out / "compare.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
