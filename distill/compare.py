"""Two student folders judged on the same captions and noise, with a two-sided sign test on the captions they
disagree on (docs/ablations.md's paired comparisons).

    python -m distill.compare A B --n 200 --splits eval,seen,unseen --reference-split eval --out DIR

On each split: accuracy overall / single / two-object of both, the discordant captions and the sign test;
on --reference-split also the PSNR of both against the teacher's 50-step DDIM images from the same noise.
Writes DIR/compare.json.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--teacher", type=Path, default=config.DEFAULT_TEACHER)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="caption stream seed")
    p.add_argument("--splits", default="eval,seen,unseen")
    p.add_argument("--reference-split", default="eval", help="split whose teacher-50 images give PSNR ('' = none)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    gens = {"A": StudentGenerator(args.a), "B": StudentGenerator(args.b)}
    report = {"a": str(args.a), "b": str(args.b), "n": args.n, "seed": args.seed, "splits": {}}
    for split in args.splits.split(","):
        captions = world.sample_captions(args.n, args.seed, split)
        seeds = [config.SAMPLE_SEED0 + i for i in range(args.n)]
        reference = None
        t0 = time.time()
        if split == args.reference_split:
            _, reference = evaluate(TeacherSampler(args.teacher, config.REFERENCE_STEPS, args.guidance), captions,
                                    seeds, args.guidance)
        res = {k: evaluate(g, captions, seeds, args.guidance, reference)[0] for k, g in gens.items()}
        a_only = sum(x and not y for x, y in zip(res["A"].verdicts, res["B"].verdicts))
        b_only = sum(y and not x for x, y in zip(res["A"].verdicts, res["B"].verdicts))
        entry = {k: {"accuracy": r.accuracy, "single": r.single, "two": r.two, "psnr_vs_teacher50": r.psnr_vs_reference}
                 for k, r in res.items()}
        entry.update(a_only=a_only, b_only=b_only, sign_test_p=sign_test(a_only, b_only),
                     seconds=round(time.time() - t0, 1))
        report["splits"][split] = entry
        print(split, json.dumps(entry), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
