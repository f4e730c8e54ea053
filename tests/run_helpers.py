"""`python -m distill.run` on tiny random teachers, as the run tests drive it: the recipe, the command line,
run.main in-process, and readers of the work folder (checkpoints, loss and sample records)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill import run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
PROMPTS = ["a red circle", "a blue square at the top", "", "a green triangle left of a white circle",
           "a large yellow square", "a red circle"]  # blank lines are skipped, repeats kept

# A fast, sensitive recipe: lr 1e-3 without warmup moves the weights ~1e-3 per step, so a wrong
# batch, a lost step or a mis-ordered resume shows; EMA makes the exported weights path-dependent.
# The condition projection trains in the form it is saved in (--condition-space diffusers), so that the exported
# weights equal the EMA of the checkpoint bit for bit; the default (trained as a "sinusoid" student, written
# converted) has its own test in test_run_conditioning.py.
FLAGS = ["--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup", "0", "--ema", "0.5", "--max-minutes", "0",
         "--checkpoint-every", "2", "--sample-every", "2", "--delta", "100", "--seed", "3",
         "--condition-space", "diffusers"]


def _cli(root, teacher, prompts, name, extra=()):
    return ["--teacher", str(teacher), "--prompts", str(prompts), "--out", str(root / name / "student"),
            "--work", str(root / name / "work"), *FLAGS, *extra]


def teacher_and_prompts(root: Path, prompts: list[str]) -> tuple[Path, Path, Path]:
    """(root, a tiny random teacher under it, a file of `prompts`) for a module's runs."""
    from tests.tiny import make_tiny_teacher

    teacher = make_tiny_teacher(root / "teacher")
    file = root / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    return root, teacher, file


def recipe_cli(setup: tuple[Path, Path, Path], name: str, flags: list[str], extra=()) -> list[str]:
    """The command line of run `name` under setup's root (teacher_and_prompts) with a module's recipe `flags`."""
    root, teacher, prompts = setup
    return ["--teacher", str(teacher), "--prompts", str(prompts), "--out", str(root / name / "student"),
            "--work", str(root / name / "work"), *flags, *extra]


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)


def _in_process(argv) -> str:
    """run.main here (imports already paid), single-threaded like the subprocesses, so results
    compare bitwise with theirs; returns stdout."""
    threads, buf = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            run.main(argv)
    finally:
        torch.set_num_threads(threads)
    return buf.getvalue()


def _tensors(work: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(work / "checkpoints" / f"step-{step:08d}" / "tensors.safetensors"))


def _losses(work: Path) -> list[dict]:
    return _records(work / "loss.jsonl")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _psnr(a, b) -> float:
    """PSNR (dB) of two uint8 images, written out here rather than taken from the code under test."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 99.0 if mse == 0 else min(99.0, 10 * np.log10(255.0**2 / mse))
