"""`python -m distill.run --refine`: the final hop alone, against stored targets of the frozen starting
student (the baseline run's student); the targets, resume, their cache key, 2-process DDP; --final-hop's
draw of t; --preset refine."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boot.method import (
    NoiseSchedule,
)
from distill import batches, config, loading, refine, run
from tests.run_helpers import (
    ROOT,
    _cli,
    _error,
    _in_process,
    _losses,
    _run,
    _tensors,
)
from tests.tiny import LATENT


def _refine_cli(setup, baseline, name, extra=()):
    return _cli(*setup, name, ["--init-from", str(baseline[0] / "student"), "--final-hop", "200", "--refine", "12",
                               *extra])


@pytest.fixture(scope="module")
def refined(baseline, setup):
    return setup[0] / "refine", _in_process(_refine_cli(setup, baseline, "refine"))


def _targets(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "final_hop_targets.safetensors"))


def test_refine_trains_g0_on_stored_final_hop_targets(refined, baseline, setup):
    _, teacher_dir, prompts = setup
    out, stdout = refined
    stored = _targets(out / "work")
    assert len(stored["t"]) == 12 and stored["t"].min() > 100 and stored["t"].max() <= 200  # (F − Δ, F]
    assert stored["w"].min() >= 1.0 and stored["w"].max() <= 6.0
    # Each target: the teacher's DDIM from the frozen starting student's ŷ_t to 0 in ceil(F/Δ) = 2 steps.
    teacher = loading.load_teacher(teacher_dir)
    sched = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    frozen = loading.build_student(teacher, sched, str(baseline[0] / "student")).eval()
    with pytest.raises(ValueError, match="reads its UNet as 'teacher-at-T', not --parameterization 'direct'"):
        loading.build_student(teacher, sched, str(baseline[0] / "student"), "direct")
    states, rows = loading.encode_prompts(teacher.text, loading.read_prompts(prompts))
    cond, uncond = states[rows[stored["prompt"]]], teacher.text.encode([""]).float()
    # Written out here with the teacher's UNet and diffusers' ᾱ (not boot.method): x-space DDIM (η = 0) with
    # CFG on the v-prediction, t -> t - t // 2 -> 0, from x_t = α_t ŷ_t + σ_t ε; the target is the signal
    # of the last x, y_0 = (x_0 − σ_0 ε) / α_0.
    from diffusers import DDIMScheduler

    abar = DDIMScheduler.from_pretrained(teacher_dir / "scheduler").alphas_cumprod.double()
    expected = []
    with torch.no_grad():
        y_t = frozen(stored["noise"], stored["t"], cond, stored["w"]).double()
        for i in range(12):
            eps, w, t = stored["noise"][i:i + 1].double(), float(stored["w"][i]), int(stored["t"][i])
            y = y_t[i:i + 1]
            for u, v in ((t, t - t // 2), (t - t // 2, 0)):
                x_u = abar[u].sqrt() * y + (1 - abar[u]).sqrt() * eps
                pred = teacher.unet(x_u.float().expand(2, -1, -1, -1), torch.tensor([u, u]),
                                    torch.cat([uncond, cond[i:i + 1]])).sample.double()
                v_hat = pred[:1] + w * (pred[1:] - pred[:1])
                x0 = abar[u].sqrt() * x_u - (1 - abar[u]).sqrt() * v_hat
                e_hat = (1 - abar[u]).sqrt() * x_u + abar[u].sqrt() * v_hat
                x_v = abar[v].sqrt() * x0 + (1 - abar[v]).sqrt() * e_hat
                y = (x_v - (1 - abar[v]).sqrt() * eps) / abar[v].sqrt()
            expected.append(y.float())
    assert torch.allclose(stored["y"], torch.cat(expected), atol=1e-4)
    assert (stored["y"] - y_t.float()).abs().max() > 1e-3  # the teacher's two steps moved ŷ_t
    # The loop trains only the final hop's term, and the student moves off its start.
    losses = _losses(out / "work")
    assert [r["step"] for r in losses] == [0, 1, 2, 3]
    assert all(r["boundary"] == 0 and r["bootstrap"] > 0 for r in losses)
    meta = json.loads((out / "student" / "boot.json").read_text())
    assert (meta["hyperparameters"]["refine"], meta["hyperparameters"]["final_hop"]) == (12, 200)
    unet = "unet/diffusion_pytorch_model.safetensors"
    start, after = load_file(str(baseline[0] / "student" / unet)), load_file(str(out / "student" / unet))
    assert max((after[k] - start[k]).abs().max().item() for k in start) > 1e-4


def test_refine_with_distribution_matching_adds_the_term_on_the_same_targets(refined, baseline, setup):
    """--refine with --dmd-weight: the stored regression targets plus DMD's term on the same one-step image (the
    teacher stays loaded for it); the targets are the plain refinement's, the weights move elsewhere."""
    import shutil

    work = setup[0] / "refine-dmd" / "work"
    work.mkdir(parents=True)
    shutil.copy(refined[0] / "work" / "final_hop_targets.safetensors", work)
    _in_process(_refine_cli(setup, baseline, "refine-dmd", ["--dmd-weight", "1", "--dmd-fake-lr", "1e-3"]))
    torch.testing.assert_close(_targets(work), _targets(refined[0] / "work"), rtol=0, atol=0)
    losses, plain = _losses(work), _losses(refined[0] / "work")
    assert all(r["dmd"] > 0 and r["fake"] > 0 and r["boundary"] == 0 for r in losses)
    assert losses[0]["bootstrap"] == pytest.approx(plain[0]["bootstrap"], rel=1e-6)  # same start, same targets
    assert all(r["loss"] > r["bootstrap"] for r in losses)  # + λ·L_DM
    meta = json.loads((setup[0] / "refine-dmd" / "student" / "boot.json").read_text())["hyperparameters"]
    assert (meta["refine"], meta["dmd_weight"]) == (12, 1.0)
    unet = "unet/diffusion_pytorch_model.safetensors"
    mine = load_file(str(setup[0] / "refine-dmd" / "student" / unet))
    theirs = load_file(str(refined[0] / "student" / unet))
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) > 1e-6


def test_refine_resumes_to_the_same_weights_and_reuses_only_matching_targets(refined, baseline, setup):
    import shutil

    work = setup[0] / "refine-resumed" / "work"
    work.mkdir(parents=True)
    shutil.copy(refined[0] / "work" / "final_hop_targets.safetensors", work)
    stamp = (work / "final_hop_targets.safetensors").stat().st_mtime_ns
    argv = _refine_cli(setup, baseline, "refine-resumed")
    _in_process([*argv, "--steps", "2"])
    assert "(step 2)" in _in_process([*argv, "--resume"])
    assert (work / "final_hop_targets.safetensors").stat().st_mtime_ns == stamp, "same recipe: targets reused"
    ref, got = _tensors(refined[0] / "work", 4), _tensors(work, 4)
    for k in ref:  # model, EMA and optimizer state
        assert torch.allclose(ref[k], got[k], rtol=0, atol=1e-7), k
    # Another final hop makes other targets: they are recomputed, not reused.
    _in_process([*_refine_cli(setup, baseline, "refine-resumed", ["--final-hop", "300"]), "--steps", "1"])
    stored = _targets(work)
    assert stored["t"].min() > 200 and stored["t"].max() <= 300


def test_refine_targets_are_keyed_on_the_contents_of_prompts_and_unets(baseline, setup, tmp_path):
    """The stored targets are reused only for the same prompts file contents and the same teacher and
    starting-student UNets, even when every path stays the same."""
    import shutil

    _, teacher, prompts = setup
    teacher2, start, file = tmp_path / "teacher", tmp_path / "start", tmp_path / "prompts.txt"
    shutil.copytree(teacher, teacher2)
    shutil.copytree(baseline[0] / "student", start)
    shutil.copy(prompts, file)
    p = run.parser()
    cfg = run.config_from_args(p.parse_args(["--teacher", str(teacher2), "--prompts", str(file), "--init-from",
                                             str(start), "--final-hop", "200", "--refine", "12", "--batch-size", "4"]),
                               p)
    key = refine.refine_key(cfg)
    assert refine.refine_key(cfg) == key
    unet = "unet/diffusion_pytorch_model.safetensors"
    for changed, path in ((file, file), (teacher2, teacher2 / unet), (start, start / unet)):
        original = path.read_bytes()
        path.write_bytes(original + b" ")  # same path, other contents
        assert refine.refine_key(cfg) != key, changed
        path.write_bytes(original)
    assert refine.refine_key(cfg) == key
    assert refine.refine_key(dataclasses.replace(cfg, refine=16)) != key


def test_refine_two_process_ddp_equals_one_process(refined, baseline, setup):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "distill.run", *_refine_cli(setup, baseline, "refine-ddp")]
    proc = _run(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = setup[0] / "refine-ddp" / "work"
    ref, got = _targets(refined[0] / "work"), _targets(work)  # each rank computed half the rows
    assert torch.equal(ref["t"], got["t"]) and torch.allclose(ref["y"], got["y"], atol=1e-5)
    ref, got, mid = _tensors(refined[0] / "work", 4), _tensors(work, 4), _tensors(refined[0] / "work", 2)
    norm = lambda d: sum(v.double().pow(2).sum() for v in d.values()).sqrt().item()  # noqa: E731
    for prefix in ("unet.", "ema."):
        moved = norm({k: ref[k] - mid[k] for k in ref if k.startswith(prefix)})
        diff = norm({k: ref[k] - got[k] for k in ref if k.startswith(prefix)})
        assert moved > 0.01 and diff < 1e-2 * moved, (prefix, moved, diff)


def test_final_hop_draws_its_share_from_below_f_and_the_rest_above():
    plain = batches.draw_batch(config.RunConfig(batch_size=400, seed=2), 3, 10, LATENT, 999)
    cfg = config.RunConfig(batch_size=400, seed=2, delta=20, final_hop=100, final_fraction=0.3)
    b = batches.draw_batch(cfg, 3, 10, LATENT, 999)
    final = b.t <= 100
    assert b.t[final].min() >= 81 and b.t[final].max() <= 100 and b.t[~final].max() <= 999
    assert 0.2 < final.float().mean() < 0.4
    # the same prompts, noise and guidance as without --final-hop: only t is drawn differently
    assert torch.equal(b.noise, plain.noise) and torch.equal(b.prompt, plain.prompt) and torch.equal(b.w, plain.w)


def test_refine_preset_is_the_recorded_stage_4_recipe(tmp_path, capsys):
    """--preset refine sets what the shipped student's stage 4 ran with (its boot.json record under
    continued_from), needs --init-from, and leaves the other presets' final hop and refine off."""
    p = run.parser()
    cfg = lambda *argv: run.config_from_args(p.parse_args(list(argv)), p)  # noqa: E731
    (tmp_path / "s" / "unet").mkdir(parents=True)
    refine = cfg("--preset", "refine", "--init-from", str(tmp_path / "s"))
    meta = json.loads((ROOT / "pretrained" / "shapes-boot" / "boot.json").read_text())
    stage4 = meta["continued_from"]["hyperparameters"]
    assert stage4["refine"] == 65536  # the record this test reads is stage 4's
    keys = ("batch_size", "lr", "warmup", "ema", "num_prompts", "final_hop", "refine", "refine_space", "delta",
            "solver_steps", "beta", "guidance_min", "guidance_max", "target", "val_every", "val_n", "keep",
            "parameterization")
    assert {k: getattr(refine, k) for k in keys} == {k: stage4[k] for k in keys}
    assert cfg("--preset", "refine", "--init-from", str(tmp_path / "s"), "--refine", "1024").refine == 1024
    for preset in ("quick", "full"):
        assert (cfg("--preset", preset).final_hop, cfg("--preset", preset).refine) == (0, 0)
    assert cfg("--preset", "full").val_n == 128
    err = _error(["--preset", "refine"], capsys)
    assert "--refine needs --final-hop F and --init-from STUDENT" in err
