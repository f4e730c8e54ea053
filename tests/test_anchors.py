"""`python -m distill.run --anchors M`: the anchor rows end to end on a tiny random teacher (boot.json, the
logged term, resume) and the refused flags. The term itself is checked against a hand computation in
tests/test_boot.py (test_anchor_rows_regress_the_image_on_the_teachers_ddim_sample)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distill import run
from distill.batches import anchor_weights
from tests.run_helpers import _in_process, _tensors, recipe_cli, teacher_and_prompts

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle left of a white circle",
           "a large yellow square"]
FLAGS = ["--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup", "0", "--ema", "0.5", "--max-minutes", "0",
         "--checkpoint-every", "1", "--sample-every", "0", "--eval-n", "0", "--delta", "100", "--seed", "3",
         "--anchors", "2", "--anchor-steps", "3", "--anchor-weight", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return teacher_and_prompts(tmp_path_factory.mktemp("anchors"), PROMPTS)


def _cli(setup, name, extra=()):
    return recipe_cli(setup, name, FLAGS, extra)


@pytest.fixture(scope="module")
def anchored(setup):
    _in_process(_cli(setup, "anchored"))
    return setup[0] / "anchored"


def test_anchor_weights_mark_the_first_rows():
    assert anchor_weights(5, 2, 1.5).tolist() == [1.5, 1.5, 0.0, 0.0, 0.0]
    assert anchor_weights(3, 0, 1.0).tolist() == [0.0, 0.0, 0.0]
    assert anchor_weights(2, 2, 4.0).tolist() == [4.0, 4.0]


def test_run_with_anchors_records_them_and_logs_the_term(anchored, setup):
    meta = json.loads((anchored / "student" / "boot.json").read_text())["hyperparameters"]
    assert (meta["anchors"], meta["anchor_steps"], meta["anchor_weight"]) == (2, 3, 2.0)
    records = [json.loads(line) for line in (anchored / "work" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["anchor"] > 0 for r in records)
    # Two of the four rows carry the term: the logged loss is the mean of L_BS + β·L_BC + L_A over the batch.
    for r in records:
        assert r["loss"] == pytest.approx(r["bootstrap"] + r["boundary"] + r["anchor"], rel=1e-5)
    _in_process(_cli(setup, "plain", ["--anchors", "0"]))
    plain = [json.loads(line) for line in (setup[0] / "plain" / "work" / "loss.jsonl").read_text().splitlines()]
    assert "anchor" not in plain[0]
    # Step 0 (the same weights, the same batch): the same bootstrap and boundary terms, plus the anchors'.
    assert plain[0]["bootstrap"] == pytest.approx(records[0]["bootstrap"], rel=1e-5)
    assert plain[0]["boundary"] == pytest.approx(records[0]["boundary"], rel=1e-5)


def test_resume_with_anchors_equals_the_uninterrupted_run(anchored, setup, capsys):
    work = setup[0] / "resumed" / "work"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copytree(anchored / "work" / "checkpoints" / "step-00000002", work / "checkpoints" / "step-00000002")
    out = _in_process([*_cli(setup, "resumed"), "--resume"])
    assert "(step 2)" in out
    ref, got = _tensors(anchored / "work", 3), _tensors(work, 3)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], rtol=0, atol=1e-7), k
    with pytest.raises(SystemExit):
        _in_process([*_cli(setup, "resumed"), "--resume", "--anchor-weight", "1"])
    assert "anchor_weight 2.0 -> 1.0 differ from the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--anchors", "-1"], "--anchors must be in [0, --batch-size]"),
    (["--anchors", "5", "--batch-size", "4"], "--anchors must be in [0, --batch-size]"),
    (["--anchors", "1", "--anchor-steps", "0"], "--anchor-steps must be >= 1"),
    (["--anchors", "1", "--anchor-weight", "0"], "--anchor-weight must be > 0"),
    (["--anchors", "1", "--preset", "refine", "--init-from", "pretrained/shapes-boot"],
     "--anchors needs the teacher in the loop"),
])
def test_bad_anchor_flags(setup, flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run.main(["--teacher", str(setup[1]), "--num-prompts", "4", "--work", str(tmp_path), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
