"""`python -m distill.run`'s input errors, each a clear message and exit code 2: prompts files, teacher
folders, flags, and a resume whose recipe differs from the checkpoint's."""

from __future__ import annotations

import json

import pytest

from tests.run_helpers import (
    _cli,
    _error,
    _in_process,
)


@pytest.fixture
def tiny_teacher(setup):
    return setup[1]


def test_empty_prompts_file(tmp_path, tiny_teacher, capsys):
    (tmp_path / "p.txt").write_text("\n  \n")
    err = _error(["--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "p.txt")], capsys)
    assert "holds no prompts" in err


def test_non_utf8_prompts_file(tmp_path, tiny_teacher, capsys):
    (tmp_path / "p.txt").write_bytes(b"a red circle\na caf\xe9 square\n")
    err = _error(["--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "p.txt")], capsys)
    assert "p.txt:2: not valid UTF-8" in err


def test_missing_prompts_file_and_teacher(tmp_path, tiny_teacher, capsys):
    err = _error(["--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "nope.txt")], capsys)
    assert "nope.txt does not exist" in err
    err = _error(["--teacher", str(tmp_path / "no-teacher"), "--num-prompts", "4"], capsys)
    assert "no-teacher does not exist" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    err = _error(["--teacher", str(tmp_path / "half"), "--num-prompts", "4"], capsys)
    assert "lacks vae, scheduler/" in err


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--guidance-min", "5", "--guidance-max", "2"], "--guidance-min <= --guidance-max"),
    (["--guidance-scale", "9"], "outside"),
    (["--target", "ema", "--ema", "0"], "--target ema needs --ema > 0"),
    (["--ema", "1"], "--ema must be in"),
    (["--boundary-fraction", "0"], "--boundary-fraction must be in (0, 1]"),
    (["--boundary-fraction", "1.5"], "--boundary-fraction must be in (0, 1]"),
    (["--t-power", "0.5"], "--t-power must be in [1, 4]"),
    (["--delta-power", "-1"], "--delta-power must be in [0, 4]"),
    (["--huber-c", "-0.1"], "--huber-c must be in [0, 10]"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in (0, 1)"),
    (["--guidance-power", "-5"], "--guidance-power must be in [-4, 4]"),
    (["--guidance-power", "1", "--guidance-min", "0"], "--guidance-power needs --guidance-min > 0"),
    (["--t-sweep", "-1"], "--t-sweep must be >= 0"),
    (["--t-sweep", "100", "--t-power", "2"], "--t-sweep needs --t-power 1 and --final-hop 0"),
    (["--t-power", "2", "--final-hop", "100"], "--t-power needs --final-hop 0"),
    (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
    (["--lr-schedule", "cooldown", "--cooldown", "0"], "--cooldown must be in (0, 1]"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--final-hop", "10"], "--final-hop must be 0 (off) or >= --delta"),
    (["--final-hop", "40", "--final-fraction", "1"], "--final-fraction must be in (0, 1)"),
    (["--final-hop", "999"], "must be below the teacher's last timestep 999"),
    (["--refine", "8"], "--refine needs --final-hop F and --init-from STUDENT"),
])
def test_bad_flags(tiny_teacher, flags, message, capsys, tmp_path):
    err = _error(["--teacher", str(tiny_teacher), "--num-prompts", "4", "--work", str(tmp_path), *flags], capsys)
    assert message in err


def test_resume_refuses_a_changed_recipe(baseline, setup, tmp_path, capsys):
    root, teacher, prompts = setup
    import shutil

    shutil.copytree(baseline[0] / "work", tmp_path / "work")
    argv = _cli(root, teacher, prompts, "x", ["--resume"])
    argv[argv.index("--work") + 1] = str(tmp_path / "work")
    argv[argv.index("--delta") + 1] = "50"
    err = _error(argv, capsys)
    assert "delta 100 -> 50" in err


def test_a_cosine_run_resumes_only_with_its_steps(baseline, setup, tmp_path, capsys):
    """A constant learning rate lets --steps grow on resume; a cosine schedule ends at --steps, so a resume
    that changes it is refused before any weight loads."""
    root, teacher, prompts = setup
    import shutil

    shutil.copytree(baseline[0] / "work", tmp_path / "work")
    for meta_path in (tmp_path / "work" / "checkpoints").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["meta"]["config"]["lr_schedule"] = "cosine"
        meta_path.write_text(json.dumps(meta))
    argv = _cli(root, teacher, prompts, "x", ["--resume", "--lr-schedule", "cosine"])
    argv[argv.index("--work") + 1] = str(tmp_path / "work")
    steps = argv[argv.index("--steps") + 1]
    argv[argv.index("--steps") + 1] = str(int(steps) + 3)
    err = _error(argv, capsys)
    assert f"steps {steps} -> {int(steps) + 3} differ from the checkpoint" in err
    at = argv.index("--lr-schedule")
    err = _error(argv[:at] + argv[at + 2:], capsys)  # a constant resume of a cosine run: refused for the schedule
    assert "lr_schedule 'cosine' -> 'constant'" in err


def test_a_checkpoint_predating_the_condition_space_resumes_as_the_diffusers_form(baseline, setup, tmp_path, capsys):
    """Runs made before --condition-space trained the diffusers form: without the flag, resuming one says so
    (before loading any weight); with --condition-space diffusers it resumes."""
    root, teacher, prompts = setup
    import shutil

    shutil.copytree(baseline[0] / "work", tmp_path / "work")
    for meta_path in (tmp_path / "work" / "checkpoints").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["meta"]["config"]["condition_space"]
        meta_path.write_text(json.dumps(meta))
    argv = _cli(root, teacher, prompts, "x", ["--resume"])
    argv[argv.index("--work") + 1] = str(tmp_path / "work")
    at = argv.index("--condition-space")
    err = _error(argv[:at] + argv[at + 2:], capsys)
    assert "condition_space 'diffusers' -> 'sinusoid' differ from the checkpoint" in err
    argv[argv.index("--out") + 1] = str(tmp_path / "s")
    assert "resumed" in _in_process(argv)


def test_a_guidance_choice_by_the_judge_needs_grammar_prompts(tiny_teacher, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    err = _error(["--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "p.txt"), "--work", str(tmp_path),
                  "--guidance-offsets", "0,0.5", "--select", "judge"], capsys)
    assert "--guidance-offsets with --select judge judges grammar captions" in err


def test_compile_is_refused_on_the_cpu(tiny_teacher, capsys, tmp_path):
    err = _error(["--teacher", str(tiny_teacher), "--num-prompts", "4", "--work", str(tmp_path), "--compile",
                  "--device", "cpu"], capsys)
    assert "--compile is refused on the CPU" in err


def test_keep_best_needs_validation(tmp_path, tiny_teacher, capsys):
    err = _error(["--teacher", str(tiny_teacher), "--keep", "best"], capsys)
    assert "--keep best needs --val-every > 0" in err
    (tmp_path / "p.txt").write_text("a red circle\n")
    err = _error(["--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "p.txt"), "--val-every", "5",
                  "--select", "judge"], capsys)
    assert "--select judge judges grammar captions" in err
