"""The SD-1.5 and SD-2.x families end to end on tiny random-weight folders (boot_tools.fixtures).

Per family: `distill.run --teacher DIR --prompts FILE` for a few steps -> student folder ->
BootPipeline image -> `boot_serve.export` -> OnnxPipeline image within 2/255 -> the same image
from a real tritonserver on the exported repository. Then the folders BOOT refuses at load (one
line, exit code 2, no traceback), in distill.run and in boot_serve.export.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from boot.folders import FolderError, check_model_folder
from boot_tools import fixtures
from distill import loading, run

PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn"]
SEEDS = [0, 7]
TOLERANCE = 2  # uint8 levels
# The family's text stack: width of the token states, pad token id of its tokenizer.
FAMILIES = {"sd15": {"pad_id": 49407, "prediction_type": "epsilon"},
            "sd2": {"pad_id": 0, "prediction_type": "v_prediction"}}
# Convergence recipes (batch 8, no warmup, no EMA). The epsilon families' students are teacher-at-T-scaled-lr
# (the learning rate of their UNet steps multiplied by α_T/σ_T, docs/byo-teacher.md). Measured by these tests
# on the 2-core AMD EPYC CPU: fixed-batch bootstrap loss 3.07 -> 2.12 and sample PSNR 19.4 -> 20.2 dB
# (SD-1.5), 0.141 -> 0.0995 and 16.3 -> 19.7 dB (SD-2), 3.42 -> 2.06 and 18.5 -> 22.8 dB (SDXL).
RECIPES = {"sd15": ["--steps", "30", "--lr", "1e-3", "--parameterization", "teacher-at-T-scaled-lr"],
           "sd2": ["--steps", "40", "--lr", "3e-4"],
           "sdxl": ["--steps", "30", "--lr", "1e-3", "--parameterization", "teacher-at-T-scaled-lr"]}


def _quiet(fn, *args):
    """Call with stdout captured (the tests read files, not logs), one thread as on the CI's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x).astype(np.int16) - np.asarray(y)).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {arch: fixtures.make_teacher(arch, "tiny", root / arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def students(teachers, prompts_file, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch, teacher in teachers.items():
        root = tmp_path_factory.mktemp(f"{arch}-run")
        out[arch] = _quiet(run.main, ["--teacher", str(teacher), "--prompts", str(prompts_file), "--steps", "2",
                                      "--batch-size", "2", "--sample-every", "0", "--out", str(root / "student"),
                                      "--work", str(root / "work")])
    return out


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_end_to_end(arch, teachers, students, tmp_path):
    from boot.pipeline import BootPipeline
    from boot_serve import export
    from boot_serve.client import Client
    from boot_serve.onnx_pipeline import OnnxPipeline
    from boot_serve.triton_server import TritonServer

    student = students[arch]
    meta = json.loads((student / "boot.json").read_text())
    assert meta["prediction_type"] == FAMILIES[arch]["prediction_type"]
    assert meta["latent_shape"] == [4, 8, 8] and meta["image_shape"] == [64, 64, 3]  # 8x VAE
    assert (student / "tokenizer").is_dir() and (student / "text_encoder").is_dir()
    # The teacher samples with leading spacing; the student keeps its noise schedule in a one-step scheduler.
    taught = json.loads((teachers[arch] / "scheduler" / "scheduler_config.json").read_text())
    sched = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    assert taught["timestep_spacing"] == "leading" and sched["beta_schedule"] == taught["beta_schedule"]

    # PyTorch reference: CLIP text stack, 77 token states.
    pipe = BootPipeline.from_pretrained(student)
    states = pipe.encode_prompt(PROMPTS[:2])
    assert states.shape == (2, 77, 32)
    ids = pipe.text.tokenizer(PROMPTS[0], padding="max_length", max_length=77)["input_ids"]
    assert ids[:2] == [49406, 320] and ids[-1] == FAMILIES[arch]["pad_id"]
    reference = pipe(PROMPTS[:2], SEEDS, 3.0)
    assert reference[0].size == (64, 64) and float(np.asarray(reference[0]).std()) > 0

    # Export: a CLIP text encoder graph and the CLIP tokenizer in the repository.
    repo = tmp_path / "model_repository"
    assert _quiet(export.main, ["--student", str(student), "--repository", str(repo), "--parity-batches", "1",
                                "--e2e-prompts", "2"]) == 0
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["max_length"] == 77 and manifest["hidden_size"] == 32 and manifest["image_shape"] == [64, 64, 3]
    tokenizer = json.loads((repo / manifest["tokenizer"] / "tokenizer.json").read_text())
    assert tokenizer["padding"]["pad_id"] == FAMILIES[arch]["pad_id"]
    onnx_pipe = OnnxPipeline.from_pretrained(repo, providers=["CPUExecutionProvider"])
    onnx_images = onnx_pipe(PROMPTS[:2], SEEDS, 3.0)
    assert _diff(onnx_images, reference) <= TOLERANCE

    # Served by the real tritonserver.
    with TritonServer(repo, exit_timeout=5, log_path=tmp_path / "tritonserver.log") as server, \
            Client(server.http_url, "http", timeout=60) as client:
        served = client.generate(PROMPTS[:2], SEEDS, 3.0)
    assert _diff(served, onnx_images) <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Refusals at load
# --------------------------------------------------------------------------------------------
def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _edit(path: Path, **values) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


def _refused(argv: list[str], capsys) -> str:
    """distill.run's one error line (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        _quiet(run.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _wide_text_encoder(folder: Path, width: int) -> None:
    """Replace the folder's text encoder with a real CLIP text model of another width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.rmtree(folder / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**dict(fixtures.text_config("L", "tiny"), hidden_size=width))).save_pretrained(
        folder / "text_encoder")


def bad_folders(teacher: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of a good teacher, each with one problem, and the words its error must contain."""
    cases = {}
    wide = _copy(teacher, root / "wide")
    _wide_text_encoder(wide, 48)
    cases["cross-attention"] = (wide, "cross-attention width is 32 but its text encoder states are 48 wide")
    unknown = _copy(teacher, root / "unknown")
    _edit(unknown / "scheduler" / "scheduler_config.json", prediction_type="flow")
    cases["prediction type"] = (unknown, "unknown prediction type 'flow'")
    zero = _copy(teacher, root / "zero-snr")
    _edit(zero / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    cases["zero SNR"] = (zero, "epsilon prediction on a zero-terminal-SNR schedule")
    for part in ("text_encoder", "vae", "unet", "tokenizer"):
        folder = _copy(teacher, root / f"no-{part}")
        shutil.rmtree(folder / part)
        cases[f"no {part}"] = (folder, f"lacks {part}/")
    return cases


def test_distill_run_refuses_folders_it_cannot_distil(teachers, prompts_file, tmp_path, capsys):
    cases = bad_folders(teachers["sd15"], tmp_path)
    capsys.readouterr()  # the copies' own save logs
    for name, (folder, words) in cases.items():
        err = _refused(["--teacher", str(folder), "--prompts", str(prompts_file), "--work", str(tmp_path / "w")],
                       capsys)
        assert words in err, (name, err)
        assert str(folder) in err


def test_cross_attention_check_sums_every_text_encoder(tmp_path):
    """Two text encoders (SDXL): the UNet reads their states concatenated."""
    folder = fixtures.make_teacher("sdxl", "tiny", tmp_path / "sdxl")
    assert check_model_folder(folder) == folder  # 32 + 32 = 64
    _edit(folder / "text_encoder_2" / "config.json", hidden_size=48)
    with pytest.raises(FolderError, match=r"cross-attention width is 64 but its text encoder states are 80 wide "
                                          r"\(text_encoder 32 \+ text_encoder_2 48 = 80\)"):
        check_model_folder(folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FolderError, match="lacks tokenizer_2/"):
        check_model_folder(folder)


def test_export_refuses_student_folders_it_cannot_load(students, tmp_path, capsys):
    from boot_serve import export

    student = students["sd15"]
    wide = _copy(student, tmp_path / "wide")
    _wide_text_encoder(wide, 48)
    no_text = _copy(student, tmp_path / "no-text")
    shutil.rmtree(no_text / "text_encoder")
    unknown = _copy(student, tmp_path / "unknown")
    _edit(unknown / "boot.json", prediction_type="flow")
    cases = {wide: "cross-attention width is 32 but its text encoder states are 48 wide",
             no_text: "lacks text_encoder/", unknown: "unknown prediction type 'flow'"}
    capsys.readouterr()
    for folder, words in cases.items():
        assert _quiet(export.main, ["--student", str(folder), "--repository", str(tmp_path / "repo")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "repo" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------
# Convergence: a few dozen steps on each family's tiny fixture
# --------------------------------------------------------------------------------------------
def _fixed_batch_losses(teacher_dir: Path, student_dir: Path | None, parameterization: str) -> dict[str, float]:
    """BootLoss of a student (online = target) on one fixed batch: the student folder's, or with
    None the untrained student distill.run starts from."""
    from boot.loss import BootLoss
    from boot.method import NoiseSchedule, TeacherX0

    teacher = loading.load_teacher(teacher_dir)
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    student = loading.build_student(teacher, schedule, str(student_dir) if student_dir else None, parameterization)
    g = torch.Generator().manual_seed(99)
    n = 32
    noise = torch.randn(n, *teacher.latent_shape, generator=g)
    t = torch.randint(1, schedule.T + 1, (n,), generator=g)
    w = 1 + 5 * torch.rand(n, generator=g)
    cond, pooled = teacher.text.encode_pooled([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    uncond, uncond_pooled = teacher.text.unconditional()
    expand = (lambda x: None if x is None else x.float().expand(n, *x.shape[1:]))  # noqa: E731
    teacher_x0 = TeacherX0(teacher.unet, schedule, teacher.prediction_type, teacher.time_ids)
    with torch.no_grad():
        terms = BootLoss()(student.eval(), student, teacher_x0, noise, cond.float(), expand(uncond), w, t,
                           None if pooled is None else pooled.float(), expand(uncond_pooled))
    return {k: float(v.mean()) for k, v in terms.items()}


def _denoiser(folder: Path, out: Path, steps: int = 100, batch: int = 16) -> Path:
    """A copy of a teacher folder whose UNet was trained `steps` steps to denoise synthetic latents,
    one smooth pattern per prompt (plus low-frequency variation; 10% unconditional): a random-weight
    epsilon UNet does not predict the noise (its output at T is uncorrelated with ε), so its x0 at T
    is ε/α_T, about 15x the noise, and there is no image for a student to approach."""
    import torch.nn.functional as F

    from boot import sdxl
    from boot.method import NoiseSchedule

    shutil.copytree(folder, out)
    teacher = loading.load_teacher(out)
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    states, pooled = teacher.text.encode_pooled(PROMPTS)
    null, null_pooled = teacher.text.unconditional()
    if pooled is None:  # one code path: a stand-in pooled embedding the UNet never sees
        pooled = null_pooled = torch.zeros(len(PROMPTS), 1)
    c, h, w = teacher.latent_shape
    g = torch.Generator().manual_seed(123)
    patterns = 0.9 * F.interpolate(torch.randn(len(PROMPTS), c, 2, 2, generator=g), size=(h, w), mode="bilinear")
    unet = teacher.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    for _ in range(steps):
        i = torch.randint(0, len(PROMPTS), (batch,), generator=g)
        x0 = patterns[i] + 0.25 * F.interpolate(torch.randn(batch, c, 4, 4, generator=g), size=(h, w),
                                                mode="bilinear")
        eps, t = torch.randn(batch, c, h, w, generator=g), torch.randint(0, schedule.T + 1, (batch,), generator=g)
        a, s = schedule.alpha[t].view(-1, 1, 1, 1), schedule.sigma[t].view(-1, 1, 1, 1)
        drop = torch.rand(batch, generator=g) < 0.1
        cond = torch.where(drop.view(-1, 1, 1), null, states[i])
        extra = sdxl.unet_kwargs(None if teacher.time_ids is None else
                                 torch.where(drop.view(-1, 1), null_pooled, pooled[i]), teacher.time_ids)
        target = eps if teacher.prediction_type == "epsilon" else a * eps - s * x0
        loss = (unet(a * x0 + s * eps, t, cond, **extra).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().save_pretrained(out / "unet", safe_serialization=True)
    return out


@pytest.mark.parametrize("arch", list(RECIPES))
def test_family_converges(arch, teachers, prompts_file, tmp_path):
    """Over a few dozen steps the bootstrap loss (on a fixed batch) falls and the student's images
    come closer to the teacher's 50-step DDIM ones (sample PSNR, the run's own record). The SD-1.5
    folder's UNet is first trained briefly to denoise (`_denoiser`): with random weights its
    epsilon prediction gives no image to distil."""
    teacher = teachers[arch] if arch in teachers else fixtures.make_teacher(arch, "tiny", tmp_path / arch)
    if "--parameterization" in RECIPES[arch]:  # the epsilon families
        teacher = _quiet(_denoiser, teacher, tmp_path / "teacher")
    steps = RECIPES[arch][RECIPES[arch].index("--steps") + 1]  # sample PSNR at step 0 and at the end
    out = _quiet(run.main, ["--teacher", str(teacher), "--prompts", str(prompts_file), *RECIPES[arch],
                            "--batch-size", "8", "--warmup", "0", "--ema", "0", "--sample-every", steps,
                            "--out", str(tmp_path / "student"), "--work", str(tmp_path / "work")])
    meta = json.loads((out / "boot.json").read_text())
    if arch != "sd2":  # recorded, with its step scale α_T/σ_T
        assert meta["parameterization"] == "teacher-at-T-scaled-lr" and abs(meta["update_scale"] - 0.0684) < 1e-3
    else:
        assert meta["parameterization"] == "teacher-at-T" and "update_scale" not in meta
    psnr = [json.loads(line)["psnr_vs_teacher"] for line in (tmp_path / "work" / "samples.jsonl").open()]
    before = _fixed_batch_losses(teacher, None, meta["parameterization"])
    after = _fixed_batch_losses(teacher, out, meta["parameterization"])
    print(arch, "bootstrap", before["bootstrap"], "->", after["bootstrap"], "boundary", before["boundary"], "->",
          after["boundary"], "PSNR", psnr)
    assert after["bootstrap"] < 0.85 * before["bootstrap"]
    assert psnr[-1] > psnr[0] + 0.5
