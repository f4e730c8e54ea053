"""distill.selection: the judge-free choice of a student's recommended guidance (PSNR against the
teacher's own DDIM images from the same noise), on tiny random SD-architecture models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill import evaluate, selection
from tests.tiny import make_tiny_student, make_tiny_teacher


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 99.0 if mse == 0 else min(99.0, 10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    teacher = make_tiny_teacher(root / "teacher")
    # A student whose images depend on w (random condition projection), trained range [1, 5].
    student = make_tiny_student(teacher, root / "student", guidance_range=(1.0, 5.0), perturb=0.5)
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square at the top\na cat on a mat\n")
    return root, teacher, student, prompts


def test_guidance_choice_is_the_w_closest_to_the_teachers_images(models, monkeypatch, capsys):
    root, teacher, student, prompts = models
    out = root / "sel"
    argv = ["--student", str(student), "--teacher", str(teacher), "--prompts", str(prompts), "--n", "3",
            "--guidance", "1,3,5", "--teacher-steps", "10", "--out", str(out)]
    report = selection.main(argv)
    rows = report["scales"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0, 5.0]
    assert all("accuracy" not in r for r in rows)  # "a cat on a mat" is no grammar caption: no judge
    psnrs = [r["psnr_vs_teacher"] for r in rows]
    assert len(set(psnrs)) == 3 and report["chosen"] == rows[int(np.argmax(psnrs))]["guidance_scale"]
    assert report["rule"] == "psnr" and report["teacher_guidance_scale"] == 3.0  # the teacher's recommended w
    # Recomputed here: the student folder at w = 5 against the teacher's 10-step DDIM images at its w = 3.
    captions = selection.validation_prompts(["a red circle", "a blue square at the top", "a cat on a mat"], 3, 11)
    assert sorted(captions) == sorted(["a red circle", "a blue square at the top", "a cat on a mat"])
    seeds = [1_000_000 + i for i in range(3)]
    ours = evaluate.StudentGenerator(student)(captions, seeds, 5.0)
    ref = evaluate.TeacherSampler(teacher, 10, 3.0)(captions, seeds, 3.0)
    assert np.mean([_psnr(a, b) for a, b in zip(ours, ref)]) == pytest.approx(psnrs[2], abs=1e-6)
    # The teacher's images are cached: a second choice, now written into boot.json, samples no teacher.
    monkeypatch.setattr(evaluate, "TeacherSampler", None)
    again = selection.main([*argv, "--write"])
    assert again["scales"] == rows
    meta = json.loads((student / "boot.json").read_text())
    assert meta["guidance_scale"] == report["chosen"]
    assert meta["guidance_selection"]["rule"] == "psnr" and meta["guidance_selection"]["value"] == max(psnrs)
    assert f"rule psnr: w = {report['chosen']:g}" in capsys.readouterr().out


def test_judge_rule_needs_grammar_prompts_and_the_trained_range(models, capsys):
    root, teacher, student, prompts = models
    for extra, message in ((["--prompts", str(prompts), "--rule", "judge"], "--rule judge needs shapes-grammar"),
                           (["--guidance", "1,9"], "trained range [1.0, 5.0]")):
        argv = ["--student", str(student), "--teacher", str(teacher), "--guidance", "2", "--n", "2",
                "--out", str(root / "bad"), *extra]
        with pytest.raises(SystemExit) as exc:
            selection.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_validation_prompts_and_pick():
    prompts = ["b", "a", "b", "c"]
    drawn = selection.validation_prompts(prompts, 5, 1)
    assert sorted(drawn[:3]) == ["a", "b", "c"] and drawn[3:] == drawn[:2]  # distinct first, then repeated
    assert drawn == selection.validation_prompts(prompts, 5, 1) != selection.validation_prompts(prompts, 5, 2)
    records = [{"step": 0, "psnr_vs_teacher": 20.0, "accuracy": 0.5}, {"step": 1, "psnr_vs_teacher": 22.0,
               "accuracy": 0.4}, {"step": 2, "psnr_vs_teacher": 22.0, "accuracy": 0.6}]
    assert selection.pick(records, "psnr")["step"] == 1 and selection.pick(records, "judge")["step"] == 2
    assert selection.pick([], "psnr") is None
