"""The distribution-matching term (boot/dmd.py): its gradient, its zero at fake == real, the fake model's update,
and `python -m distill.run --dmd-weight` end to end on a tiny random teacher (boot.json, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boot import checkpoint, dmd
from boot.method import NoiseSchedule, TeacherX0
from distill import run
from tests.run_helpers import _in_process, recipe_cli, teacher_and_prompts  # run.main in-process, single-threaded
from tests.tiny import LATENT, scheduler_config, tiny_unet

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle left of a white circle",
           "a large yellow square"]
FLAGS = ["--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--ema", "0.5", "--max-minutes", "0",
         "--checkpoint-every", "1", "--sample-every", "0", "--delta", "100", "--seed", "5",
         "--condition-space", "diffusers", "--dmd-weight", "0.5", "--dmd-fake-updates", "2", "--dmd-fake-lr", "1e-3",
         "--dmd-t-range", "0.1", "0.9"]


def _parts(seed: int = 0):
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    teacher = TeacherX0(tiny_unet(seed=seed), schedule, "v_prediction")
    b = 3
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, 6, 384, generator=gen)
    uncond = torch.randn(1, 6, 384, generator=gen).expand(b, -1, -1)
    x = torch.randn(b, *LATENT, generator=gen)
    t = torch.tensor([100, 500, 900])
    n = torch.randn(b, *LATENT, generator=gen)
    return schedule, teacher, cond, uncond, x, t, n


def test_gradient_wrt_the_image_is_the_normalised_score_difference():
    schedule, teacher, cond, uncond, x, t, n = _parts()
    fake = dmd.FakeX0.from_teacher(teacher)
    with torch.no_grad():  # a fake model that differs from the teacher
        for p in fake.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    w = torch.tensor([1.0, 3.0, 5.0])
    x = x.requires_grad_(True)
    out = dmd.DistributionMatchingLoss()(x, teacher, fake, cond, uncond, w, t, n)
    out["loss"].sum().backward()
    with torch.no_grad():
        x_t = schedule.alpha[t].view(-1, 1, 1, 1) * x + schedule.sigma[t].view(-1, 1, 1, 1) * n
        real, fk = teacher(x_t, t, cond, uncond, w), fake(x_t, t, cond)
        norm = (x - real).abs().mean((1, 2, 3), keepdim=True)
        expected = (fk - real) / norm
    chw = x[0].numel()  # L_DM is a mean over C, H, W: ∂L/∂x̂ = grad / (C·H·W)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(x.grad * chw, expected, rtol=1e-5, atol=1e-6)
    # and the same as the formula's own helper
    torch.testing.assert_close(dmd.DistributionMatchingLoss.gradient(x.detach(), real, fk), expected)


def test_fake_equal_to_the_teacher_without_guidance_gives_no_gradient():
    _, teacher, cond, uncond, x, t, n = _parts(1)
    fake = dmd.FakeX0.from_teacher(teacher)  # f_φ = the teacher's conditional x0, = f_w at w = 1
    x = x.requires_grad_(True)
    out = dmd.DistributionMatchingLoss()(x, teacher, fake, cond, uncond, torch.ones(3), t, n)
    out["loss"].sum().backward()
    # Zero up to the rounding of the CFG combination f_u + 1·(f_c − f_u), which is f_c within an ulp of f32.
    assert float(out["grad_norm"].max()) < 1e-6
    assert float(x.grad.abs().max()) < 1e-8
    # and exactly zero where "real" and "fake" are the same tensor
    real = torch.randn_like(x)
    assert float(dmd.DistributionMatchingLoss.gradient(x.detach(), real, real).abs().max()) == 0.0


def test_fake_update_lowers_its_loss_on_a_fixed_batch():
    schedule, teacher, cond, _, x, t, n = _parts(2)
    fake = dmd.FakeX0.from_teacher(teacher)
    opt = torch.optim.AdamW(fake.unet.parameters(), lr=1e-3, weight_decay=0.0)
    loss_fn = dmd.FakeScoreLoss()
    x = 0.5 * torch.tanh(x)  # "student samples" the teacher was never trained on
    before = float(loss_fn(fake, x, cond, t, n).detach().mean())
    dmd.FakeScoreUpdate(updates=10, t_min=0.1, t_max=0.9)(fake, opt, x, cond, torch.Generator().manual_seed(0))
    after = float(loss_fn(fake, x, cond, t, n).detach().mean())
    assert after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in teacher.unet.parameters())  # the teacher stays frozen


def test_a_guided_fake_starts_at_the_guided_teacher_and_learns_through_its_cfg():
    schedule, teacher, cond, uncond, x, t, n = _parts(3)
    fake = dmd.FakeX0.from_teacher(teacher, guided=True)
    w = torch.tensor([1.5, 3.0, 5.0])
    x_req = x.clone().requires_grad_(True)
    out = dmd.DistributionMatchingLoss()(x_req, teacher, fake, cond, uncond, w, t, n)
    out["loss"].sum().backward()
    assert float(out["grad_norm"].max()) == 0.0 and float(x_req.grad.abs().max()) == 0.0  # fake = real at w
    plain = dmd.DistributionMatchingLoss()(x, teacher, dmd.FakeX0.from_teacher(teacher), cond, uncond, w, t, n)
    assert float(plain["grad_norm"].min()) > 1e-3  # the conditional fake pushes along (w − 1)·(f_c − f_u)
    with pytest.raises(ValueError, match="needs the unconditional states and w"):
        fake(x, t, cond)
    # Its update trains both branches through the CFG combination at each sample's w.
    opt = torch.optim.AdamW(fake.unet.parameters(), lr=1e-3, weight_decay=0.0)
    loss_fn, target = dmd.FakeScoreLoss(), 0.5 * torch.tanh(x)
    before = float(loss_fn(fake, target, cond, t, n, None, uncond, w).detach().mean())
    dmd.FakeScoreUpdate(updates=10, t_min=0.1, t_max=0.9)(fake, opt, target, cond, torch.Generator().manual_seed(0),
                                                            None, uncond, w)
    assert float(loss_fn(fake, target, cond, t, n, None, uncond, w).detach().mean()) < 0.8 * before


def test_timesteps_stay_in_the_range():
    t = dmd.draw_timesteps(0.02, 0.98, 999, 10_000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 979


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return teacher_and_prompts(tmp_path_factory.mktemp("dmd"), PROMPTS)


def _cli(setup, name, extra=()):
    return recipe_cli(setup, name, FLAGS, extra)


@pytest.fixture(scope="module")
def baseline(setup):
    _in_process(_cli(setup, "base"))
    return setup[0] / "base"


def test_run_with_dmd_records_it_and_logs_its_terms(baseline):
    meta = json.loads((baseline / "student" / "boot.json").read_text())["hyperparameters"]
    assert (meta["dmd_weight"], meta["dmd_fake_updates"], meta["dmd_fake_lr"]) == (0.5, 2, 1e-3)
    assert (meta["dmd_t_min"], meta["dmd_t_max"], meta["dmd_start"]) == (0.1, 0.9, 0)
    records = [json.loads(line) for line in (baseline / "work" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["dmd"] > 0 and r["fake"] > 0 for r in records)
    tensors = load_file(str(baseline / "work" / "checkpoints" / "step-00000003" / "tensors.safetensors"))
    assert any(k.startswith("fake.") for k in tensors) and any(k.startswith("optim-fake.") for k in tensors)


def test_resume_with_dmd_restores_the_fake_model(baseline, setup):
    import shutil

    work = setup[0] / "resumed" / "work"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copytree(baseline / "work" / "checkpoints" / "step-00000002", work / "checkpoints" / "step-00000002")
    (work / "loss.jsonl").write_text("\n".join((baseline / "work" / "loss.jsonl").read_text().splitlines()[:2]) + "\n")
    out = _in_process([*_cli(setup, "resumed"), "--resume"])
    assert "(step 2)" in out
    ref = load_file(str(baseline / "work" / "checkpoints" / "step-00000003" / "tensors.safetensors"))
    got = load_file(str(work / "checkpoints" / "step-00000003" / "tensors.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:  # student, EMA, fake model and both optimizers
        assert torch.allclose(ref[k], got[k], rtol=0, atol=1e-7), k


def test_dmd_start_delays_the_term(setup):
    _in_process(_cli(setup, "late", ["--dmd-start", "2"]))
    records = [json.loads(line) for line in (setup[0] / "late" / "work" / "loss.jsonl").read_text().splitlines()]
    assert [r["dmd"] > 0 for r in records] == [False, False, True]


def test_dmd_fake_warmup_trains_the_fake_model_alone_before_the_term(setup):
    _in_process(_cli(setup, "warm", ["--dmd-start", "2", "--dmd-fake-warmup", "1"]))
    work = setup[0] / "warm" / "work"
    records = [json.loads(line) for line in (work / "loss.jsonl").read_text().splitlines()]
    assert [r["dmd"] > 0 for r in records] == [False, False, True]
    assert [r["fake"] > 0 for r in records] == [False, True, True]
    # Step 1's fake update happened, the student's step did not see it: the same student as without the warm-up.
    late = setup[0] / "late" / "work" / "checkpoints" / "step-00000002" / "tensors.safetensors"
    if not late.exists():
        _in_process(_cli(setup, "late", ["--dmd-start", "2"]))
    ref, got = load_file(str(late)), load_file(str(work / "checkpoints" / "step-00000002" / "tensors.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref if k.startswith("unet."))
    assert any(not torch.equal(ref[k], got[k]) for k in ref if k.startswith("fake."))


def test_run_with_a_guided_fake_records_it(setup):
    _in_process(_cli(setup, "guided", ["--dmd-fake", "guided"]))
    meta = json.loads((setup[0] / "guided" / "student" / "boot.json").read_text())["hyperparameters"]
    assert meta["dmd_fake"] == "guided"
    records = [json.loads(line) for line in (setup[0] / "guided" / "work" / "loss.jsonl").read_text().splitlines()]
    assert records[0]["dmd"] == 0.0 and all(r["dmd"] > 0 for r in records[1:])  # 0 until the fake moves


def test_a_checkpoint_without_the_fake_optimizer_is_refused(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = checkpoint.save(tmp_path, 1, {"unet": net}, opt)
    assert checkpoint.load(path, {"unet": net}, opt)["step"] == 1  # old form still loads
    with pytest.raises(ValueError, match="no optimizer 'fake'"):
        checkpoint.load(path, {"unet": net}, opt, {"fake": torch.optim.AdamW(net.parameters())})


@pytest.mark.parametrize("flags, message", [
    (["--dmd-weight", "-1"], "--dmd-weight must be >= 0"),
    (["--dmd-weight", "1", "--dmd-fake-updates", "0"], "--dmd-fake-updates must be >= 1"),
    (["--dmd-fake-lr", "0"], "--dmd-fake-lr must be > 0"),
    (["--dmd-t-range", "0.9", "0.1"], "--dmd-t-range needs 0 < MIN <= MAX <= 1"),
    (["--dmd-t-range", "0", "0.5"], "--dmd-t-range needs 0 < MIN <= MAX <= 1"),
    (["--dmd-start", "-1"], "--dmd-start must be >= 0"),
    (["--dmd-start", "2", "--dmd-fake-warmup", "3"], "--dmd-fake-warmup N needs 0 <= N <= --dmd-start"),
])
def test_bad_dmd_flags(setup, flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run.main(["--teacher", str(setup[1]), "--num-prompts", "4", "--work", str(tmp_path), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_are_listed_in_their_group():
    text = run.parser().format_help(everything=True)  # --help-all: the expert groups too
    assert "distribution matching of the one-step image" in text and "--dmd-t-range MIN MAX" in text
    assert Path(run.__file__).exists()
