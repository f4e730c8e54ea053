"""What `python -m distill.run` reports is what its folder does: the end-of-run evaluation (printed and in
boot.json), the validation records and the step --keep best exports score the model the folder holds, the
images `BootPipeline.from_pretrained(out)` makes, for every form a run can write the student in; and a student
folder whose conditioning record does not match its weights is refused at load."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boot.conditioning import SAVED_CONDITIONING_KEY, TIME_WEIGHTS, conditioning_record
from boot.method import DEFAULT_CONDITIONING, GUIDANCE_BAND, LEGACY_CONDITIONING
from distill import config, evaluate, run, selection
from shapes_world import world
from tests.tiny import make_tiny_student, make_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
EVAL_N, VAL_N, SEED = 4, 3, 3
# Grammar prompts (the judged evaluation runs) and a fast recipe: lr 1e-3 without warmup moves the condition
# projection far enough in 4 steps that scoring any other form than the written one shows in the PSNR.
FLAGS = ["--num-prompts", "12", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup", "0", "--ema", "0.5",
         "--max-minutes", "0", "--checkpoint-every", "4", "--sample-every", "2", "--delta", "100",
         "--seed", str(SEED), "--guidance-max", "5", "--eval-n", str(EVAL_N), "--val-every", "2",
         "--val-n", str(VAL_N), "--keep", "best", "--select", "judge"]
FORMS = {  # the other forms distill.run writes a student in (the default has its own test below)
    "projected-space": ("--condition-space", "projected"),  # written as the plain projection it equals
    "band-limited": ("--condition-space", "diffusers", "--guidance-band", str(GUIDANCE_BAND)),  # as trained
    "sinusoid-kind": ("--conditioning", "sinusoid"),  # as trained, for BootPipeline only
    "lora": ("--lora-rank", "2"),  # adapters merged, then converted as the default is
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded, as the evaluation subprocess runs (OMP_NUM_THREADS=1), so that images compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("reports") / "teacher")


def _in_process(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run.main(argv)
    return buf.getvalue()


def _fresh_evaluation(student: Path, teacher: Path, w: float | None, out: Path, subprocess_: bool = True) -> dict:
    """`python -m distill.evaluate` of the written folder on the run's captions, seeds and guidance (w None: each
    model at its own recommended one) (in this process with `subprocess_` False: the same command, its imports
    already paid)."""
    argv = ["--student", str(student), "--teacher", str(teacher), "--steps", str(config.REFERENCE_STEPS),
            "--n", str(EVAL_N), "--seed", str(SEED), *(["--guidance", str(w)] if w is not None else []),
            "--out", str(out)]
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "distill.evaluate", *argv], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluate.main(argv)
    return {r["name"]: r for r in json.loads((out / "report.json").read_text())["results"]}


def _prefer_step_2(monkeypatch) -> None:
    """The validation's judge (VAL_N captions each at steps 0, 2, 4) passes step 2 only, so --keep best --select
    judge exports step 2 of 4: neither the start nor the last step. The end-of-run evaluation judges with
    shapes_world.judge.judge_detailed, which stays the real judge."""
    calls = {"n": 0}

    def judge(caption, image):
        calls["n"] += 1
        return VAL_N < calls["n"] <= 2 * VAL_N

    monkeypatch.setattr("shapes_world.judge.judge", judge)


def _check_reports(teacher: Path, out: Path, work: Path, printed: str, fresh: dict) -> dict:
    """The run's reports against a fresh evaluation (`fresh`, distill.evaluate's results by name) and against
    the written folder's own images; returns boot.json."""
    from boot.pipeline import BootPipeline

    meta = json.loads((out / "boot.json").read_text())
    w = meta["guidance_scale"]
    # 1. The end-of-run evaluation, printed and in boot.json, is the fresh evaluation of the folder.
    student, teacher50 = fresh["student-1"], fresh[f"teacher-{config.REFERENCE_STEPS}"]
    ev = meta["evaluation"]
    assert ev["captions"] == EVAL_N and ev["guidance_scale"] == w
    assert ev["psnr_vs_teacher"] == student["psnr_vs_reference"]
    assert ev["student_accuracy"] == student["accuracy"]
    assert ev[f"teacher{config.REFERENCE_STEPS}_accuracy"] == teacher50["accuracy"]
    ours = {r["name"]: r for r in json.loads((work / "eval" / "report.json").read_text())["results"]}
    assert ours["student-1"]["correct"] == student["correct"]
    assert (f"student-1 accuracy {100 * student['accuracy']:.1f}% vs teacher-{config.REFERENCE_STEPS} "
            f"{100 * teacher50['accuracy']:.1f}%, PSNR vs teacher {student['psnr_vs_reference']:.2f} dB "
            f"({EVAL_N} held-out captions)") in printed
    # 2. --keep best exported step 2 of 4, and its validation record is the folder's PSNR against the teacher's
    #    50-step images (cached in the work folder) on the validation captions and noise.
    records = [json.loads(line) for line in (work / "val.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in records] == [(0, 0.0), (2, 1.0), (4, 0.0)]
    assert meta["steps"] == meta["validation"]["best"]["step"] == 2 and meta["steps_run"] == 4
    captions, seeds = world.sample_captions(VAL_N, SEED + 1, "eval"), [config.VAL_SEED0 + i for i in range(VAL_N)]
    images = BootPipeline.from_pretrained(out)(captions, seeds, w)
    reference = [Image.fromarray(a) for a in load_file(work / "val_teacher.safetensors")["images"].numpy()]
    assert meta["validation"]["best"]["psnr_vs_teacher"] == selection.mean_psnr(images, reference)
    return meta


def test_the_default_run_reports_what_its_folder_does(teacher, tmp_path, monkeypatch):
    """The newcomer's run (a "diffusers-guidance" student trained as a "sinusoid" one and written converted):
    its printed and recorded evaluation equal `python -m distill.evaluate` of the folder, its validation and the
    step --keep best exports score the folder's UNet, and so does the sample grid; plain diffusers runs the folder
    to the same images."""
    from boot.pipeline import BootPipeline
    from boot.samplers import TeacherSampler

    _prefer_step_2(monkeypatch)
    out, work = tmp_path / "student", tmp_path / "work"
    printed = _in_process(["--teacher", str(teacher), "--out", str(out), "--work", str(work), *FLAGS])
    w = json.loads((out / "boot.json").read_text())["guidance_scale"]
    meta = _check_reports(teacher, out, work, printed, _fresh_evaluation(out, teacher, w, tmp_path / "fresh"))
    assert meta["conditioning"]["kind"] == DEFAULT_CONDITIONING
    assert meta["conditioning"]["trained_as"]["kind"] == LEGACY_CONDITIONING
    # 3. The sample grid's PSNR is the folder's, against the teacher's images of the same prompts and seeds.
    prompts = world.sample_captions(config.N_SAMPLES, SEED, "eval")
    seeds = [config.SAMPLE_SEED0 + i for i in range(config.N_SAMPLES)]
    pipe = BootPipeline.from_pretrained(out)
    grid, teacher_grid = pipe(prompts, seeds, w), TeacherSampler(teacher, config.REFERENCE_STEPS, w)(prompts, seeds, w)
    assert meta["sample_psnr_vs_teacher"] == float(np.mean([min(evaluate.psnr(a, b), 99.0)
                                                           for a, b in zip(grid, teacher_grid)]))
    # 4. Plain diffusers on the folder makes those images (to a uint8 level: its guidance features round w - 1
    #    in float32 after the subtraction, tests/test_diffusers_compat.py).
    from diffusers import StableDiffusionPipeline

    from tests.test_diffusers_compat import diffusers_images, load

    theirs = diffusers_images(load(StableDiffusionPipeline, out), prompts, pipe.noise(seeds), w)
    assert np.abs(theirs.astype(int) - np.stack([np.asarray(im) for im in grid]).astype(int)).max() <= 1


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_reports_what_its_folder_does(teacher, tmp_path, monkeypatch, form):
    _prefer_step_2(monkeypatch)
    out, work = tmp_path / "student", tmp_path / "work"
    printed = _in_process(["--teacher", str(teacher), "--out", str(out), "--work", str(work), *FLAGS,
                           "--sample-every", "0", *FORMS[form]])
    w = json.loads((out / "boot.json").read_text())["guidance_scale"]
    _check_reports(teacher, out, work, printed, _fresh_evaluation(out, teacher, w, tmp_path / "fresh", False))


def test_the_recommended_guidance_chosen_at_the_end_is_what_the_folder_and_its_report_use(teacher, tmp_path,
                                                                                             monkeypatch):
    """--guidance-offsets: the judge passes only the validation images at the last candidate w, so the run
    recommends it (boot.json guidance_scale and guidance_selection), evaluates the student there and the teacher
    at its own guidance, and a fresh `distill.evaluate` of the folder (each model at its own guidance) gives the
    same report."""
    from boot.samplers import TeacherSampler

    calls = {"n": 0}

    def judge(caption, image):  # validation at steps 0, 2, 4, then the candidates w - 0.5, w, w + 0.5
        calls["n"] += 1
        return calls["n"] > 5 * VAL_N

    monkeypatch.setattr("shapes_world.judge.judge", judge)
    out, work = tmp_path / "student", tmp_path / "work"
    printed = _in_process(["--teacher", str(teacher), "--out", str(out), "--work", str(work), *FLAGS,
                           "--keep", "last", "--sample-every", "0", "--guidance-offsets=-0.5,0,0.5"])
    assert calls["n"] == 6 * VAL_N
    meta = json.loads((out / "boot.json").read_text())
    w_teacher = TeacherSampler(teacher, 1).default_guidance
    assert 1.5 <= w_teacher <= 4.5  # inside the trained range [1, 5] with both neighbours
    chosen = meta["guidance_selection"]
    assert [r["guidance_scale"] for r in chosen["scales"]] == [w_teacher - 0.5, w_teacher, w_teacher + 0.5]
    assert [r["accuracy"] for r in chosen["scales"]] == [0.0, 0.0, 1.0] and chosen["rule"] == "judge"
    assert meta["guidance_scale"] == w_teacher + 0.5 and chosen["value"] == 1.0
    assert chosen["teacher_guidance_scale"] == w_teacher and chosen["prompts"] == {"split": "eval", "seed": SEED + 1}
    assert f"recommended guidance by judge: w = {w_teacher + 0.5:g}" in printed
    ev = meta["evaluation"]
    assert ev["guidance_scale"] == w_teacher + 0.5 and ev["teacher_guidance_scale"] == w_teacher
    fresh = _fresh_evaluation(out, teacher, None, tmp_path / "fresh", False)
    student, teacher50 = fresh["student-1"], fresh[f"teacher-{config.REFERENCE_STEPS}"]
    assert ev["student_accuracy"] == student["accuracy"] and ev["psnr_vs_teacher"] == student["psnr_vs_reference"]
    assert ev[f"teacher{config.REFERENCE_STEPS}_accuracy"] == teacher50["accuracy"]
    ours = {r["name"]: r for r in json.loads((work / "eval" / "report.json").read_text())["results"]}
    assert ours["student-1"]["correct"] == student["correct"]


# --------------------------------------------------------------------------------------------
# A conditioning record that does not match the weights
# --------------------------------------------------------------------------------------------
def _edit_meta(folder: Path, **conditioning) -> None:
    meta = json.loads((folder / "boot.json").read_text())
    meta["conditioning"] = {**meta.get("conditioning", {}), **conditioning}
    (folder / "boot.json").write_text(json.dumps(meta, indent=1))


def _drop_saved_kind(folder: Path) -> None:
    """unet/config.json without the saved-kind key (as folders written before it was recorded)."""
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config.pop(SAVED_CONDITIONING_KEY)
    path.write_text(json.dumps(config, indent=1))


def _mismatched(teacher: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Student folders whose boot.json conditioning does not match their weights, and what the refusal names."""
    from distill import diffusers_folder

    dg = DEFAULT_CONDITIONING
    cases = {}
    # boot.json edited to the other kind, both ways (and without the saved-kind key, for older folders)
    folder = make_tiny_student(teacher, root / "dg-as-sinusoid", perturb=0.5, conditioning=dg)
    _edit_meta(folder, kind=LEGACY_CONDITIONING)
    cases["edited to sinusoid"] = folder, "saved as a 'diffusers-guidance' student"
    folder = shutil.copytree(folder, root / "dg-as-sinusoid-unmarked")
    _drop_saved_kind(folder)
    cases["edited to sinusoid, older folder"] = folder, f"holds {TIME_WEIGHTS}"
    folder = make_tiny_student(teacher, root / "sinusoid-as-dg", perturb=0.5)
    _edit_meta(folder, **conditioning_record(dg))
    cases["edited to diffusers-guidance"] = folder, "saved as a 'sinusoid' student"
    folder = shutil.copytree(folder, root / "sinusoid-as-dg-unmarked")
    _drop_saved_kind(folder)
    cases["edited to diffusers-guidance, older folder"] = folder, f"lacks {TIME_WEIGHTS}"
    # a conversion that stopped after the converted UNet's weights, before its t weights and boot.json
    legacy = make_tiny_student(teacher, root / "legacy", perturb=0.5)
    converted = root / "converted"
    diffusers_folder.convert_student(legacy, converted)
    (converted / "unet" / TIME_WEIGHTS).unlink()
    shutil.copy(legacy / "boot.json", converted / "boot.json")
    cases["half-written conversion"] = converted, "saved as a 'diffusers-guidance' student"
    # a band recorded that the guidance weights do not keep to (all of E's columns are random here)
    folder = make_tiny_student(teacher, root / "band", perturb=0.5, conditioning=dg)
    _edit_meta(folder, guidance_band=GUIDANCE_BAND)
    cases["guidance band"] = folder, "columns above it"
    return cases


def test_a_record_that_does_not_match_the_weights_is_refused_at_load(teacher, tmp_path, capsys):
    """BootPipeline.from_pretrained, `python -m distill.evaluate` and the export refuse the folder with one line
    naming the mismatch; nothing is scored or exported."""
    from boot.pipeline import BootPipeline
    from boot_serve import export

    for case, (folder, names) in _mismatched(teacher, tmp_path).items():
        with pytest.raises(ValueError) as exc:
            BootPipeline.from_pretrained(folder)
        message = str(exc.value)
        assert "boot.json records" in message and names in message and "\n" not in message, (case, message)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            evaluate.main(["--student", str(folder), "--teacher", str(teacher), "--steps", "1", "--n", "1",
                           "--out", str(tmp_path / "eval")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and names in err, (case, err)
        assert not (tmp_path / "eval").exists()  # refused before anything was scored
        assert export.main(["--student", str(folder), "--repository", str(tmp_path / "repository")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot load the student") and err.count("\n") == 1 and names in err, (case, err)
        assert not (tmp_path / "repository").exists()
    # The same folders as written load and run.
    for name in ("legacy", "converted-ok"):
        folder = tmp_path / name
        if name == "converted-ok":
            from distill import diffusers_folder

            diffusers_folder.convert_student(tmp_path / "legacy", folder)
        assert len(BootPipeline.from_pretrained(folder)(["a red circle"], [0])) == 1
