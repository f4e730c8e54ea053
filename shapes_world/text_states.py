"""`python -m shapes_world.text_states precompute DIR`: the MiniLM text states of every caption of the shapes
grammar (or of a prompts file), for machines without the encoder package; use them with BOOT_TEXT_STATES=DIR.
The text stack that reads them is `boot.text`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from boot.text import STATES_ENV, precompute
from shapes_world import world


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shapes_world.text_states",
                                description="Precompute text states for machines without the encoder package "
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
        prompts = [c for split in ("all", "eval") for c in world.sample_captions(200_000, 0, split)]
    precompute(args.out, prompts, torch.float32 if args.fp32 else torch.float16)


if __name__ == "__main__":
    main()
