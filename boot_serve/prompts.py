"""Example prompts for the benchmark, the soak test and the demo: 1,000 captions of the shipped shapes
world (its held-out "eval" split, caption seed 0), stored as text so that serving needs none of the
training code. tests/test_layers.py holds the file equal to
`shapes_world.world.sample_captions(1000, 0, "eval")`."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_FILE = Path(__file__).with_name("example_prompts.txt")


def example_prompts(n: int, offset: int = 0) -> list[str]:
    """`n` example prompts from position `offset` on (cycling past the end of the list)."""
    lines = [line for line in EXAMPLES_FILE.read_text(encoding="utf-8").splitlines() if line]
    return [lines[(offset + i) % len(lines)] for i in range(n)]


def distinct_example_prompts(n: int, offset: int = 0) -> list[str]:
    """`n` different example prompts, in the file's order from position `offset` (the file repeats some
    captions: 708 of its 1,000 lines differ). ValueError beyond that many."""
    lines = [line for line in EXAMPLES_FILE.read_text(encoding="utf-8").splitlines() if line]
    distinct = list(dict.fromkeys(lines[offset:] + lines[:offset]))
    if n > len(distinct):
        raise ValueError(f"{EXAMPLES_FILE.name} has {len(distinct)} different prompts, {n} were asked for")
    return distinct[:n]
