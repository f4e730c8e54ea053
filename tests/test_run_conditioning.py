"""The student's guidance condition through `python -m distill.run`: a band-limited guidance embedding,
--condition-space projected (trained in the sinusoid space, saved in the exact diffusers form), and the
default (trained as a sinusoid student, written in the diffusers form)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from boot import checkpoint
from boot.conditioning import load_student_unet, save_student_unet
from boot.method import (
    DEFAULT_CONDITIONING,
    GUIDANCE_BAND,
    GUIDANCE_EMBED_SCALE,
    LEGACY_CONDITIONING,
    TIME_COND_PROJ_DIM,
    GuidanceTimeProjection,
    NoiseSchedule,
    add_condition_projection,
    guidance_embedding,
    guidance_frequencies,
    sinusoid,
    student_condition,
    unet_guidance_band,
)
from distill import loading
from tests.run_helpers import (
    _cli,
    _in_process,
    _run,
)


def test_a_band_limited_guidance_embedding_trains_only_its_band_and_stays_a_plain_diffusers_unet(setup):
    """--guidance-band F: E(w - 1)'s columns above F rad per unit of w get no gradient and are saved as
    exactly 0 (so diffusers' plain cond_proj computes the student), the band's columns train, boot.json
    records F, and --init-from keeps it."""
    from diffusers import UNet2DConditionModel

    root, teacher, prompts = setup
    _in_process(_cli(root, teacher, prompts, "band", ("--condition-space", "diffusers",
                                                      "--guidance-band", str(GUIDANCE_BAND))))
    student = root / "band" / "student"
    meta = json.loads((student / "boot.json").read_text())
    assert meta["conditioning"]["guidance_band"] == GUIDANCE_BAND
    unet = UNet2DConditionModel.from_pretrained(student / "unet", use_safetensors=True)
    weight = unet.time_embedding.cond_proj.weight
    fast = guidance_frequencies() > GUIDANCE_BAND
    assert 0 < int(fast.sum()) < len(fast)
    assert torch.equal(weight[:, fast], torch.zeros_like(weight[:, fast]))
    assert weight[:, ~fast].abs().max() > 1e-4
    s = loading.build_student(loading.load_teacher(teacher), NoiseSchedule(torch.linspace(0.999, 0.0, 1000)),
                              init_from=str(student))
    assert unet_guidance_band(s.unet) == GUIDANCE_BAND
    proc = _run([sys.executable, "-m", "distill.run", *_cli(root, teacher, prompts, "band-sinusoid",
                                                           ("--conditioning", "sinusoid", "--guidance-band", "10"))])
    assert proc.returncode == 2 and "--guidance-band needs --conditioning diffusers-guidance" in proc.stderr


def test_a_student_learning_in_the_sinusoid_space_is_saved_as_the_exact_diffusers_form(setup):
    """--condition-space projected: the cond_proj trains on a fixed map of E(w - 1) onto φ(62.5·w) and on φ(t),
    as a "sinusoid" student does, and is saved as the plain "diffusers-guidance" projection computing the
    same function (linear_1's bias takes A_t·φ(0)); saving leaves the training form untouched."""
    root, teacher, prompts = setup
    _in_process(_cli(root, teacher, prompts, "space", ("--condition-space", "projected")))
    student = root / "space" / "student"
    assert json.loads((student / "boot.json").read_text())["conditioning"]["kind"] == DEFAULT_CONDITIONING
    assert (student / "model_index.json").is_file()
    plain = load_student_unet(student / "unet", DEFAULT_CONDITIONING)
    assert isinstance(plain.time_embedding.cond_proj, GuidanceTimeProjection)
    # The training form with random weights against what it saves as.
    from diffusers import UNet2DConditionModel

    unet = add_condition_projection(UNet2DConditionModel.from_pretrained(teacher / "unet", use_safetensors=True),
                                    DEFAULT_CONDITIONING, sinusoid_space=(1.0, 5.0))
    proj = unet.time_embedding.cond_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        proj.guidance_weight.copy_(torch.randn(proj.guidance_weight.shape, generator=g) * 0.3)
        proj.time_weight.copy_(torch.randn(proj.time_weight.shape, generator=g) * 0.3)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    save_student_unet(unet, root / "space-unet")
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    saved = load_student_unet(root / "space-unet", DEFAULT_CONDITIONING)
    t = torch.tensor([0, 0, 37, 900])
    w = torch.tensor([1.0, 4.5, 2.25, 5.0])
    cond = student_condition(t, w, DEFAULT_CONDITIONING)
    emb = torch.randn(4, unet.time_embedding.linear_1.in_features, generator=g)
    with torch.no_grad():
        ours, theirs = (m.time_embedding(emb, cond) for m in (unet, saved))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (ours - unet.time_embedding(emb)).abs().max() > 0.1  # the condition matters here
    # and P·E(w - 1) is the sinusoid student's guidance feature over the range, but for its fastest columns
    # (E's log-spaced frequencies cannot hold a tone between two of them over the whole range)
    ws = torch.linspace(1.0, 5.0, 401)
    fit = guidance_embedding(ws - 1.0) @ proj.projection.T
    target = sinusoid(ws * GUIDANCE_EMBED_SCALE)
    freqs = GUIDANCE_EMBED_SCALE * torch.exp(-math.log(10000.0) * torch.arange(64) / 64)
    slow = torch.cat([freqs, freqs]) <= 20
    assert int(slow.sum()) == 112
    assert float((fit - target)[:, slow].norm() / target[:, slow].norm()) < 1e-3


@pytest.fixture(scope="module")
def default_run(setup):
    """The run recipe with the default condition space (trained as a "sinusoid" student, written converted)."""
    root, teacher, prompts = setup
    cli = _cli(root, teacher, prompts, "default")
    at = cli.index("--condition-space")
    _in_process(cli[:at] + cli[at + 2:])
    return root / "default"


def test_a_new_student_trains_as_a_sinusoid_one_and_is_written_in_the_diffusers_form(setup, default_run):
    """The default: checkpoints hold the "sinusoid" training form; the folder is a "diffusers-guidance" one
    (plain diffusers runs it), converted with the fit recorded; --conditioning sinusoid writes it unconverted."""
    root, teacher, prompts = setup
    student = default_run / "student"
    record = json.loads((student / "boot.json").read_text())["conditioning"]
    assert record["kind"] == DEFAULT_CONDITIONING and (student / "model_index.json").is_file()
    assert record["trained_as"]["kind"] == LEGACY_CONDITIONING
    assert 0 < record["trained_as"]["fit"]["relative_residual"] < 0.2  # 0.017 for the quick students
    last = checkpoint.latest(default_run / "work" / "checkpoints")
    weights = load_file(str(last / "tensors.safetensors"))
    assert weights["unet.time_embedding.cond_proj.weight"].shape[1] == TIME_COND_PROJ_DIM
    assert not any("time_weight" in k for k in weights)  # the training form is the sinusoid one
    _in_process(_cli(root, teacher, prompts, "legacy", ("--conditioning", "sinusoid")))
    legacy = json.loads((root / "legacy" / "student" / "boot.json").read_text())["conditioning"]
    assert legacy["kind"] == LEGACY_CONDITIONING and "trained_as" not in legacy


def test_a_soup_of_a_checkpoint_is_written_in_the_form_of_the_runs_folder(default_run, tmp_path):
    """boot_tools.soup converts a checkpoint's weights as the run converts its student: the EMA of the last step
    gives the run's own folder bit for bit (on the run's one thread: the conversion's least-squares fit rounds
    by thread count); --online the online student, converted the same way."""
    from boot_tools import soup

    student, last = default_run / "student", checkpoint.latest(default_run / "work" / "checkpoints")
    written = load_file(str(student / "unet/diffusion_pytorch_model.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        soup.main([str(tmp_path / "ema"), str(student), str(last)])
    finally:
        torch.set_num_threads(threads)
    ema = load_file(str(tmp_path / "ema/unet/diffusion_pytorch_model.safetensors"))
    assert ema.keys() == written.keys() and all(torch.equal(ema[k], written[k]) for k in written)
    soup.main([str(tmp_path / "online"), str(student), str(last), "--online"])
    online = load_file(str(tmp_path / "online/unet/diffusion_pytorch_model.safetensors"))
    trained = checkpoint.module_state(last, "unet")
    converted = ("time_embedding.cond_proj.weight", "time_embedding.linear_1.bias")
    assert all(torch.equal(online[k], trained[k]) for k in written if k not in converted)  # the rest as trained
    assert not any(torch.equal(online[k], trained[k]) for k in converted)  # converted like the folder's
    assert not torch.equal(online["conv_in.weight"], written["conv_in.weight"])  # not the EMA
    assert json.loads((tmp_path / "online/boot.json").read_text())["soup_checkpoint_weights"] == "online"
