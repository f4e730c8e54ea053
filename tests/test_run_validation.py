"""`python -m distill.run --val-every`: validation during training, --keep best and --select (the judge, or
PSNR against the teacher), and the full preset's defaults for them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill import config, loading, run
from tests.run_helpers import (
    FLAGS,
    PROMPTS,
    _cli,
    _in_process,
    _psnr,
)


def test_validation_keeps_the_best_step_and_exports_it(setup, tmp_path, monkeypatch, capsys):
    """--val-every judges the exported student at steps 0, 2, 4 (val.jsonl, val.png); with --keep best
    the student folder gets the best step's weights, which here the judge says is step 2."""
    calls = {"n": 0}

    def judge(caption, image):  # 3 captions per validation: calls 3..5 are step 2's
        calls["n"] += 1
        return 4 <= calls["n"] <= 6

    monkeypatch.setattr("shapes_world.judge.judge", judge)
    _, teacher, _ = setup
    work, out = tmp_path / "w", tmp_path / "s"
    run.main(["--teacher", str(teacher), "--num-prompts", "12", *FLAGS, "--sample-every", "0", "--eval-n", "0",
              "--val-every", "2", "--val-n", "3", "--keep", "best", "--select", "judge", "--out", str(out),
              "--work", str(work)])
    records = [json.loads(line) for line in (work / "val.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in records] == [(0, 0.0), (2, 1.0), (4, 0.0)]
    assert (work / "val.png").stat().st_size > 0
    meta = json.loads((out / "boot.json").read_text())
    assert meta["steps"] == 2 and meta["steps_run"] == 4 and meta["validation"]["best"]["step"] == 2
    assert meta["selection"]["rule"] == "judge" and meta["selection"]["value"] == 1.0
    exported = {**load_file(out / "unet" / "diffusion_pytorch_model.safetensors"),
                **load_file(out / "unet" / "boot_time_condition.safetensors")}
    ema = {step: {k[4:]: v for k, v in load_file(work / "checkpoints" / name / "tensors.safetensors").items()
                  if k.startswith("ema.")} for step, name in ((2, "step-00000002"), (4, "step-00000004"))}
    assert all(torch.equal(exported[k], ema[2][k]) for k in ema[2])
    assert not all(torch.equal(exported[k], ema[4][k]) for k in ema[4])
    assert "--keep best: exporting step 2" in capsys.readouterr().out


def test_psnr_selection_with_a_prompts_file_keeps_the_step_closest_to_the_teacher(setup, tmp_path, capsys):
    """The default rule needs no judge: a --prompts run validates by PSNR against the teacher's 50-step
    DDIM images (same prompts, same noise), exports the step with the highest, and records the rule and
    its value; the value is the exported student's PSNR recomputed here from its folder."""
    from boot.samplers import TeacherSampler
    from boot_serve import BootPipeline
    from distill import selection

    root, teacher, prompts = setup
    work, out = tmp_path / "w", tmp_path / "s"
    argv = _cli(root, teacher, prompts, "x", ["--sample-every", "0", "--val-every", "2", "--val-n", "3",
                                               "--lr", "3e-3"])
    argv[argv.index("--out") + 1], argv[argv.index("--work") + 1] = str(out), str(work)
    _in_process(argv)
    records = [json.loads(line) for line in (work / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4] and all("accuracy" not in r for r in records)
    psnrs = [r["psnr_vs_teacher"] for r in records]
    assert len(set(psnrs)) == 3  # the three steps differ, so the choice is a real one
    best = int(np.argmax(psnrs))
    meta = json.loads((out / "boot.json").read_text())
    assert meta["steps"] == records[best]["step"] and meta["steps_run"] == 4
    assert meta["selection"]["rule"] == "psnr" and meta["selection"]["step"] == records[best]["step"]
    assert meta["selection"]["value"] == psnrs[best] and meta["selection"]["teacher_steps"] == 50
    # Recompute: the exported student's images against the teacher's own 50-step DDIM images.
    captions = selection.validation_prompts(loading.read_prompts(prompts), 3, 3 + 1)
    assert set(captions) <= set(PROMPTS) and len(set(captions)) == 3
    seeds = [config.VAL_SEED0 + i for i in range(3)]
    w = meta["guidance_scale"]
    ours = BootPipeline.from_pretrained(out)(captions, seeds, w)
    ref = TeacherSampler(teacher, 50, w)(captions, seeds, w)
    assert np.mean([_psnr(a, b) for a, b in zip(ours, ref)]) == pytest.approx(psnrs[best], abs=1e-3)
    # The teacher's images are cached in the work folder and reused as they are.
    cached = load_file(work / "val_teacher.safetensors")
    assert all(np.array_equal(np.asarray(im), cached["images"][i].numpy()) for i, im in enumerate(ref))


def test_full_preset_validates_and_keeps_the_best_by_teacher_agreement(tmp_path):
    p = run.parser()
    cfg = lambda *argv: run.config_from_args(p.parse_args(list(argv)), p)  # noqa: E731
    assert (cfg().val_every, cfg().keep) == (0, "last")
    full = cfg("--preset", "full")
    assert (full.val_every, full.keep, full.lr, full.batch_size) == (250, "best", 1e-4, 128)
    assert full.select == "psnr"
    (tmp_path / "p.txt").write_text("a cat\n")
    own = cfg("--preset", "full", "--prompts", str(tmp_path / "p.txt"))  # PSNR against the teacher needs no judge
    assert (own.val_every, own.keep, own.select) == (250, "best", "psnr")
    judged = cfg("--preset", "full", "--prompts", str(tmp_path / "p.txt"), "--select", "judge")
    assert (judged.val_every, judged.keep) == (0, "last")
    assert cfg("--preset", "full", "--keep", "last").keep == "last"
    assert cfg("--val-every", "50").keep == "best"
