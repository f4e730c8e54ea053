"""`python -m distill.text precompute DIR`: text states for machines without the MiniLM package (used with
BOOT_TEXT_STATES=DIR). The text stack itself lives in `boot.text`; this module also keeps the old import
path of its names."""

from __future__ import annotations

from pathlib import Path

import torch

from boot.text import *  # noqa: F401,F403
from boot.text import STATES_ENV, precompute


def main(argv: list[str] | None = None) -> None:
    import argparse

    from distill import shapes

    p = argparse.ArgumentParser(description="Precompute text states for machines without the encoder package "
                                            f"(use them with {STATES_ENV}=DIR).")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("precompute", help="tokenizer + states of every grammar caption (or of --prompts)")
    pre.add_argument("out", type=Path)
    pre.add_argument("--prompts", type=Path, help="one prompt per line (default: every caption of the grammar)")
    pre.add_argument("--fp32", action="store_true", help="store float32 states (default float16)")
    args = p.parse_args(argv)
    if args.prompts:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    else:
        prompts = [c for split in ("all", "eval") for c in shapes.sample_captions(200_000, 0, split)]
    precompute(args.out, prompts, torch.float32 if args.fp32 else torch.float16)


if __name__ == "__main__":
    main()
