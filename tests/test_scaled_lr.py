"""`--parameterization teacher-at-T-scaled-lr` (earlier name: preconditioned) on a tiny epsilon teacher: the
learning rate of the student's UNet steps is multiplied by κ = α_T/σ_T, nothing else changes.

One optimizer step of distill.run from the same start, batch and seed, with and without it: AdamW's first
step is lr·g/(|g| + eps), so with the same gradients every UNet weight must move exactly κ times as far;
the optimizer's own learning rate (its checkpointed param_groups) and the logged "lr" are κ·lr. A folder
whose boot.json carries the earlier name loads and makes the same images.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from boot import checkpoint
from boot.method import PARAMETERIZATION_ALIASES, parameterization_name
from distill import run
from tests.tiny import make_tiny_teacher

LR = 1e-3
SCALED = "teacher-at-T-scaled-lr"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaled-lr")
    (root / "prompts.txt").write_text("a red circle\na blue square at the top\n")
    return make_tiny_teacher(root / "teacher", prediction_type="epsilon", zero_snr=False)


def kappa_of(teacher: Path) -> float:
    """α_T/σ_T from the teacher's scheduler config, computed here from its betas."""
    cfg = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    assert cfg["beta_schedule"] == "scaled_linear"
    abar = float(np.prod(1 - betas))
    return math.sqrt(abar) / math.sqrt(1 - abar)


def one_step(teacher: Path, out: Path, parameterization: str) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run.main(["--teacher", str(teacher), "--prompts", str(teacher.parent / "prompts.txt"),
                      "--parameterization", parameterization, "--steps", "1", "--batch-size", "2", "--lr", str(LR),
                      "--warmup", "0", "--ema", "0", "--grad-clip", "0", "--sample-every", "0", "--eval-n", "0",
                      "--max-minutes", "0", "--seed", "5", "--out", str(out / "student"), "--work", str(out / "work")])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {p: one_step(teacher, root / p, p) for p in ("teacher-at-T", SCALED)}


def test_the_earlier_name_is_an_alias():
    assert PARAMETERIZATION_ALIASES == {"preconditioned": SCALED} and parameterization_name("preconditioned") == SCALED
    assert run.parser().parse_args(["--parameterization", "preconditioned"]).parameterization == SCALED


def test_one_step_moves_the_unet_kappa_times_as_far_and_logs_that_rate(teacher, runs):
    kappa = kappa_of(teacher)
    assert 0.01 < kappa < 0.2  # SD's scaled_linear schedule: α_T/σ_T ≈ 0.068
    meta = json.loads((runs[SCALED] / "student" / "boot.json").read_text())
    assert meta["parameterization"] == SCALED and meta["update_scale"] == pytest.approx(kappa, rel=1e-5)
    start = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = {}
    for name, folder in runs.items():
        ckpt = checkpoint.latest(folder / "work" / "checkpoints")
        assert ckpt.name.endswith("00000001")
        unet = checkpoint.module_state(ckpt, "unet")
        moved[name] = torch.cat([(unet[k].double() - start[k].double()).flatten() for k in sorted(start)])
        # the rate the optimizer applied (its own param_groups) and the rate logged for the step
        groups = json.loads((ckpt / "meta.json").read_text())["optimizer"]["param_groups"]
        logged = [json.loads(line)["lr"] for line in (folder / "work" / "loss.jsonl").read_text().splitlines()]
        expected = LR * (kappa if name == SCALED else 1.0)
        assert [g["lr"] for g in groups] == pytest.approx([expected] * len(groups), rel=1e-6)
        assert logged == pytest.approx([expected], rel=1e-6)
    plain, scaled = moved["teacher-at-T"], moved[SCALED]
    assert plain.abs().max() > 0.5 * LR  # the teacher's weights did move (Adam's first step: about lr each)
    assert torch.allclose(scaled, kappa * plain, rtol=1e-3, atol=1e-8)
    assert float(scaled.norm() / plain.norm()) == pytest.approx(kappa, rel=1e-4)


def test_a_folder_recorded_under_the_earlier_name_loads_the_same(runs, tmp_path):
    from boot.pipeline import BootPipeline

    folder = runs[SCALED] / "student"
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / "boot.json").read_text())
    meta["parameterization"] = "preconditioned"
    (old / "boot.json").write_text(json.dumps(meta))
    new_pipe, old_pipe = BootPipeline.from_pretrained(folder), BootPipeline.from_pretrained(old)
    assert old_pipe.generator.student.parameterization == SCALED
    a, b = new_pipe(["a red circle"], seeds=[3]), old_pipe(["a red circle"], seeds=[3])
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
