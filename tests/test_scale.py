"""Scale features of `distill.run` and export on tiny SD-architecture teachers: half-precision teacher
folders, bf16 mixed precision, gradient checkpointing, memory options, LoRA students, the fp32 VAE inside
an fp16 export. (The full-size SD-1.5 architecture at 512², `-m slow`: test_scale_full.py.)"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from boot.loss import BootLoss
from boot.method import NoiseSchedule, OneStepGenerator, TeacherX0
from boot_tools import fixtures
from distill import config, loading, lora, memory, monitor, precision, run
from tests.tiny import make_tiny_student, make_tiny_teacher

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle left of a white circle", "a yellow square"]
FLAGS = ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--max-minutes", "0", "--delta", "100",
         "--eval-n", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(root):
    """An SD-style tiny teacher (own text encoder), fp32, v-prediction."""
    return make_tiny_teacher(root / "tiny", text_kind="folder")


@pytest.fixture(scope="module")
def sd15_fp16(root):
    """The SD-1.5 architecture at toy widths, stored in fp16 as published SD folders are."""
    return fixtures.make_teacher("sd15", "tiny", root / "sd15-fp16", dtype="fp16")


def _argv(root, teacher, name, *extra):
    return ["--teacher", str(teacher), "--prompts", str(root / "prompts.txt"), "--out", str(root / name / "student"),
            "--work", str(root / name / "work"), *FLAGS, *extra]


def _batch(teacher: loading.Teacher, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = teacher.text.encode(PROMPTS[:n]).float()
    uncond = teacher.text.encode([""]).float().expand(n, -1, -1)
    noise = torch.randn((n, *teacher.latent_shape), generator=g)
    return noise, cond, uncond, torch.tensor([900, 500, 300, 120][:n]), torch.tensor([1.0, 2.5, 4.0, 6.0][:n])


def _setup(folder, dtype=torch.float32, **student_kw):
    teacher = loading.load_teacher(folder, dtype)
    sched = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    return teacher, sched, TeacherX0(teacher.unet, sched, teacher.prediction_type), loading.build_student(
        teacher, sched, **student_kw)


def _grads(student, loss_fn, teacher_x0, batch, amp: str = "no"):
    student.unet.zero_grad(set_to_none=True)
    with precision.autocast(torch.device("cpu"), amp):
        terms = loss_fn(student, student, teacher_x0, *batch[:3], batch[4], batch[3])
    loss = terms["loss"].mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in student.unet.named_parameters() if p.grad is not None}


def _rel(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a).sqrt()
    return float(num / sum(v.double().pow(2).sum() for v in a.values()).sqrt())


# --------------------------------------------------------------------------------------------
# Half-precision teacher folders, --sample-every 0, bf16
# --------------------------------------------------------------------------------------------
def test_fp16_teacher_folder_distils_in_bf16_with_checkpointing_and_no_samples(root, sd15_fp16):
    """The command a user runs on a published (fp16) SD folder: it trains, renders no grid at all."""
    stored = load_file(str(next((sd15_fp16 / "unet").glob("*.safetensors"))))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    out = run.main(_argv(root, sd15_fp16, "fp16-bf16", "--mixed-precision", "bf16", "--gradient-checkpointing",
                         "--sample-every", "0"))
    work = root / "fp16-bf16" / "work"
    losses = [json.loads(line) for line in (work / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    assert not (work / "samples").exists() and not (work / "samples.png").exists()
    meta = json.loads((out / "boot.json").read_text())
    assert meta["sample_psnr_vs_teacher"] is None
    hp = meta["hyperparameters"]
    assert (hp["mixed_precision"], hp["teacher_dtype"], hp["gradient_checkpointing"]) == ("bf16", "auto", True)
    # The student is saved in fp32 (AdamW's master weights), whatever the teacher folder stores.
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    # Its copied text encoder and VAE are stored in fp16 as the teacher's were; the export reads them in fp32.
    from boot_serve import export as ex

    info = ex.export(out, root / "fp16-bf16" / "repo", "fp32", parity_batches=(2,), e2e_prompts=1)
    assert info["max_length"] == 77 and info["image_shape"] == [64, 64, 3]


def test_teacher_is_cast_to_the_run_precision_and_reference_grid_runs_in_it(root, sd15_fp16, monkeypatch):
    monkeypatch.setattr(config, "REFERENCE_STEPS", 4)  # the grid's sampler, shortened
    teacher = loading.load_teacher(sd15_fp16, precision.teacher_dtype("auto", "bf16"))
    assert next(teacher.unet.parameters()).dtype == torch.bfloat16
    assert next(teacher.vae.parameters()).dtype == torch.float32  # the VAE and text encoder stay fp32
    assert next(teacher.text.text_encoder.parameters()).dtype == torch.float32
    assert precision.teacher_dtype("auto", "no") == torch.float32
    assert precision.teacher_dtype("fp16", "bf16") == torch.float16
    # The reference grid of a bf16 run: the run's own bf16 UNet, no second copy.
    samples = monitor.Samples(teacher, PROMPTS[:2], 7.5, root)
    assert len(samples.teacher) == 2 and samples.teacher[0].size == (64, 64)
    # ... and equal to a sampler loading the folder itself in bf16 (same weights, same precision).
    from boot.samplers import TeacherSampler

    own = TeacherSampler(sd15_fp16, config.REFERENCE_STEPS, 7.5, dtype=torch.bfloat16)(PROMPTS[:2], samples.seeds, 7.5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(samples.teacher, own))


def test_bf16_loss_is_finite_and_close_to_fp32(tiny):
    """Same weights and batch: the BOOT loss under bf16 autocast with a bf16 teacher within 2% of fp32's and
    gradients at cosine > 0.99 (measured on this tiny teacher: 0.26% and 0.9994; on the tiny SD-1.5
    fixture 0.02% and 0.9997). The UNet outputs are read in fp32 before the x0 read, residual and 1/δ²."""
    batch = _batch(loading.load_teacher(tiny))
    loss_fn = BootLoss(delta_steps=100)
    _, _, t32, s32 = _setup(tiny)
    _, _, t16, s16 = _setup(tiny, torch.bfloat16)
    l32, g32 = _grads(s32, loss_fn, t32, batch)
    l16, g16 = _grads(s16, loss_fn, t16, batch, "bf16")
    assert np.isfinite(l16) and l16 > 0
    assert abs(l16 - l32) <= 0.02 * l32, (l16, l32)
    cos = sum((g32[k].double() * g16[k].double()).sum() for k in g32) / (
        sum(v.double().pow(2).sum() for v in g32.values()).sqrt() * sum(v.double().pow(2).sum()
                                                                         for v in g16.values()).sqrt())
    assert cos > 0.99, float(cos)


def test_unet_outputs_are_read_in_fp32_under_autocast(tiny):
    teacher, sched, teacher_x0, student = _setup(tiny, torch.bfloat16)
    noise, cond, uncond, t, w = _batch(teacher)
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert student(noise, t, cond, w).dtype == torch.float32
        assert teacher_x0(noise, t, cond, uncond, w).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    teacher, sched, teacher_x0, plain = _setup(tiny)
    ckpt = copy.deepcopy(plain)
    ckpt.unet.enable_gradient_checkpointing()
    batch, loss_fn = _batch(teacher), BootLoss(delta_steps=100)
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    torch.utils.checkpoint.checkpoint = counting
    try:
        l_ckpt, g_ckpt = _grads(ckpt, loss_fn, teacher_x0, batch)
    finally:
        torch.utils.checkpoint.checkpoint = real
    l_plain, g_plain = _grads(plain, loss_fn, teacher_x0, batch)
    assert calls["n"] > 0  # the checkpointed blocks really were recomputed
    assert l_ckpt == pytest.approx(l_plain, rel=1e-6)
    assert g_ckpt.keys() == g_plain.keys() and _rel(g_plain, g_ckpt) < 1e-5


# --------------------------------------------------------------------------------------------
# Memory: β = 0, text states, refine chunks, EMA placement
# --------------------------------------------------------------------------------------------
class _Counter(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    @property
    def time_embedding(self):  # a Student reads its conditioning kind from the UNet it holds
        return self.unet.time_embedding

    def forward(self, x, *args, **kw):
        self.batches.append(x.shape[0])
        return self.unet(x, *args, **kw)


@pytest.mark.parametrize("beta,teacher_batches,student_batches", [(1.0, [8, 8], [4, 8]), (0.0, [8], [4, 4])])
def test_beta_zero_skips_the_boundary_teacher_call_and_the_t_branch(tiny, beta, teacher_batches, student_batches):
    """Per step at K = 1: the target student (B) and the teacher's CFG call at t (2B) for L_BS; L_BC adds the
    teacher's CFG call at T (2B) and the online student's T branch (B, batched with its s branch)."""
    teacher, sched, _, student = _setup(tiny)
    t_unet, s_unet = _Counter(teacher.unet), _Counter(student.unet)
    teacher_x0 = TeacherX0(t_unet, sched, teacher.prediction_type)
    student.unet = s_unet
    noise, cond, uncond, t, w = _batch(teacher)
    terms = BootLoss(delta_steps=100, beta=beta)(student, student, teacher_x0, noise, cond, uncond, w, t)
    terms["loss"].mean().backward()
    assert t_unet.batches == teacher_batches and s_unet.batches == student_batches
    assert (terms["boundary"] == 0).all() == (beta == 0)


def test_text_states_fp16_cache_and_on_the_fly(tiny):
    teacher = loading.load_teacher(tiny)
    prompts = PROMPTS + PROMPTS[:2]
    idx = torch.tensor([5, 0, 3, 1])
    cached = memory.PromptStates(teacher.text, prompts, "fp32")
    half = memory.PromptStates(teacher.text, prompts, "fp16")
    fly = memory.PromptStates(teacher.text, prompts, "on-the-fly")
    ref = cached(idx)
    assert ref.dtype == half(idx).dtype == fly(idx).dtype == torch.float32
    assert torch.equal(ref, teacher.text.encode([prompts[i] for i in idx.tolist()]).float())
    assert torch.allclose(fly(idx), ref, atol=1e-6)
    assert torch.allclose(half(idx), ref, rtol=1e-3, atol=1e-3) and not torch.equal(half(idx), ref)
    assert half.nbytes * 2 == cached.nbytes and fly.nbytes == 0 and len(cached.table) == 4
    states, rows = loading.encode_prompts(teacher.text, prompts)  # the function the refine test calls
    assert torch.equal(states[rows[idx]], ref)


def test_refine_chunk_from_a_memory_budget():
    gb = 2**30
    assert memory.chunk_for_budget(0.5 * gb, 40 * gb) == 80
    assert memory.chunk_for_budget(0.5 * gb, 2000 * gb) == memory.MAX_REFINE_CHUNK
    assert memory.chunk_for_budget(8 * gb, 4 * gb) == 1
    assert memory.refine_chunk(5, 0, torch.device("cpu"), None) == 5
    assert memory.refine_chunk(0, 0, torch.device("cpu"), None) == memory.CPU_REFINE_CHUNK


def test_refine_targets_are_identical_across_chunk_sizes(root, tiny):
    """Each target is computed on its own sample, so the chunk changes only fp32 kernel rounding of
    batched convolutions (measured here: at most 2.5e-6 on targets of magnitude ~2)."""
    base = run.main(_argv(root, tiny, "base", "--sample-every", "0", "--ema", "0"))
    targets = {}
    for chunk in ("3", "12"):
        name = f"refine-{chunk}"
        run.main(_argv(root, tiny, name, "--sample-every", "0", "--init-from", str(base), "--final-hop", "200",
                       "--refine", "12", "--refine-chunk", chunk, "--steps", "1"))
        targets[chunk] = load_file(str(root / name / "work" / "final_hop_targets.safetensors"))
        assert json.loads((root / name / "student" / "boot.json").read_text())["hyperparameters"]["refine_chunk"] == \
            int(chunk)
    assert torch.equal(targets["3"]["t"], targets["12"]["t"]) and torch.equal(targets["3"]["noise"],
                                                                                targets["12"]["noise"])
    assert torch.allclose(targets["3"]["y"], targets["12"]["y"], rtol=0, atol=1e-5)
    assert targets["12"]["y"].abs().max() > 0.5


def test_ema_on_the_cpu_gives_the_same_student(root, tiny, capsys):
    same = run.main(_argv(root, tiny, "ema-same", "--sample-every", "0", "--ema", "0.5"))  # grids change no weight
    cpu = run.main(_argv(root, tiny, "ema-cpu", "--sample-every", "2", "--ema", "0.5", "--ema-device", "cpu"))
    a, b = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (same, cpu))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (root / "ema-cpu" / "work" / "samples" / "step-00000002.png").is_file()
    with pytest.raises(SystemExit):
        run.main(_argv(root, tiny, "ema-bad", "--ema-device", "cpu", "--target", "ema"))
    assert "--ema-device cpu needs --target online" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# LoRA students
# --------------------------------------------------------------------------------------------
def test_lora_student_starts_as_the_teacher_at_t_and_trains_only_adapters(tiny):
    teacher, sched, teacher_x0, student = _setup(tiny, lora_rank=4)
    noise, cond, uncond, t, w = _batch(teacher)
    T = torch.full_like(t, sched.T)
    with torch.no_grad():
        assert torch.allclose(student(noise, t, cond, w), teacher_x0(noise, T, cond, None, 1.0), atol=1e-6)
    trained = [n for n, p in student.unet.named_parameters() if p.requires_grad]
    assert trained and all(lora.is_trained(n) for n in trained)
    assert "time_embedding.cond_proj.weight" in trained
    assert any(".lora_A." in n for n in trained) and any(".lora_B." in n for n in trained)
    n_trained = sum(p.numel() for p in student.unet.parameters() if p.requires_grad)
    assert n_trained < 0.5 * sum(p.numel() for p in teacher.unet.parameters())
    # One optimizer step: the frozen teacher weights stay, the adapters and the projection move.
    before = {n: p.detach().clone() for n, p in student.unet.named_parameters()}
    opt = torch.optim.AdamW([p for p in student.unet.parameters() if p.requires_grad], lr=1e-3)
    BootLoss(delta_steps=100)(student, student, teacher_x0, noise, cond, uncond, w, t)["loss"].mean().backward()
    opt.step()
    moved = {n for n, p in student.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trained) and "time_embedding.cond_proj.weight" in moved


def test_lora_run_saves_a_merged_student_that_exports_with_parity(root, tiny):
    from boot.pipeline import BootPipeline
    from boot_serve import export as ex

    out = run.main(_argv(root, tiny, "lora", "--lora-rank", "4", "--sample-every", "0", "--ema", "0.5",
                         "--condition-space", "diffusers"))  # saved as trained: checkpoint and folder compare
    meta = json.loads((out / "boot.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["merged"] and meta["hyperparameters"]["lora_rank"] == 4
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    plain = load_file(str(make_tiny_student(tiny, root / "plain-student") / "unet" /
                          "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == plain.keys()  # a plain diffusers UNet: no adapter tensors left
    # Merged weights = the EMA's W + (α/r)·B·A: same outputs as the adapter student of the checkpoint.
    teacher, sched, _, adapted = _setup(tiny, lora_rank=4)
    ckpt = load_file(str(root / "lora" / "work" / "checkpoints" / "step-00000002" / "tensors.safetensors"))
    adapted.unet.load_state_dict({k[4:]: v for k, v in ckpt.items() if k.startswith("ema.")})
    assert any(v.abs().max() > 0 for k, v in ckpt.items() if k.startswith("ema.") and ".lora_B." in k)
    pipe = BootPipeline.from_pretrained(out)
    noise, cond, _, _, w = _batch(teacher)
    with torch.no_grad():
        want = OneStepGenerator(adapted.eval())(noise, cond, w)
        assert torch.allclose(pipe.generator(noise, cond, w), want, atol=1e-5)
    info = ex.export(out, root / "lora-repo", "fp32", parity_batches=(2,), e2e_prompts=1)
    assert info["parity"]["end_to_end"]["image"]["max_abs"] <= ex.TOLERANCES["fp32"].image_levels


def test_lora_rank_must_be_positive(root, tiny, capsys):
    with pytest.raises(SystemExit):
        run.main(_argv(root, tiny, "bad", "--lora-rank", "-1"))
    assert "--lora-rank must be >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Export: the VAE decoder in fp32 inside an fp16 export
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_student(root):
    """A student whose VAE decoder overflows fp16: conv_in scaled by 1e5. The GroupNorms after it make the
    decoded image nearly scale-free, so in fp32 the image is an ordinary one; in fp16 activations reach inf."""
    from diffusers import AutoencoderKL

    student = make_tiny_student(make_tiny_teacher(root / "vae-teacher"), root / "vae-student", perturb=0.1)
    vae = AutoencoderKL.from_pretrained(student / "vae", use_safetensors=True)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    vae.save_pretrained(student / "vae")
    return student


def test_fp16_export_with_an_overflowing_vae_fails_clearly(overflowing_student, root, capsys):
    from boot_serve import export as ex

    repo = root / "vae-repo16"
    rc = ex.main(["--student", str(overflowing_student), "--repository", str(repo), "--precision", "fp16",
                  "--parity-batches", "2", "--e2e-prompts", "1", "--configs", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and "graph 'vae_decoder'" in err and "--vae-precision fp32" in err, err
    assert not (repo / "manifest.json").exists()


def test_fp16_export_with_the_vae_in_fp32_passes(overflowing_student, root):
    import onnx

    from boot_serve import export as ex

    repo = root / "vae-repo16-32"
    rc = ex.main(["--student", str(overflowing_student), "--repository", str(repo), "--precision", "fp16",
                  "--vae-precision", "fp32", "--parity-batches", "2", "--e2e-prompts", "1", "--configs", "none"])
    assert rc == 0
    info = json.loads((repo / "manifest.json").read_text())
    assert info["precision"] == "fp16"
    assert {m: g["precision"] for m, g in info["graphs"].items()} == {
        "text_encoder": "fp16", "boot_unet": "fp16", "vae_decoder": "fp32"}
    assert info["parity"]["graphs"]["vae_decoder"]["image"]["tolerance_levels"] == ex.TOLERANCES["fp32"].image_levels

    def weight_types(model):
        graph = onnx.load(str(repo / model / "1" / "model.onnx")).graph
        return {init.data_type for init in graph.initializer if len(init.dims) > 1}

    assert weight_types("vae_decoder") == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in weight_types("boot_unet")
