"""SDXL-family teachers end to end, on the tiny random-weight SDXL folder of boot_tools.fixtures.

- the text stack and the teacher's sampler agree exactly with diffusers' StableDiffusionXLPipeline
  (both encoders' penultimate states, the pooled embedding, the zeroed unconditional branch, time ids);
- `distill.run --teacher DIR` -> student folder -> BootPipeline image -> export -> OnnxPipeline image
  within 2/255 -> the same image from the CPU tritonserver, in both CPU repository variants;
- folders whose added conditioning does not fit their text encoders are refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from boot import sdxl
from boot.folders import load_text_stack
from boot_tools import fixtures
from distill import run

TOLERANCE = 2  # uint8 levels
PROMPTS = ["a photo of a cat", "a red circle on a blue square", "a dog in the snow", "two apples on a table"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch: on 2 shared cores a second thread made the tiny UNet 20x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return fixtures.make_teacher("sdxl", "tiny", tmp_path_factory.mktemp("sdxl") / "teacher")


@pytest.fixture(scope="module")
def diffusers_pipe(teacher):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, local_files_only=True, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_stack_is_the_sdxl_pipelines_encode_prompt(teacher, diffusers_pipe):
    stack = load_text_stack(teacher)
    assert stack.pooled and stack.force_zeros_for_empty_prompt
    states, pooled = stack.encode_pooled(PROMPTS[:2])
    want, want_neg, want_pooled, want_neg_pooled = diffusers_pipe.encode_prompt(
        PROMPTS[:2], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert states.shape == (2, 77, 64) and pooled.shape == (2, 32)  # 32 + 32 wide; bigG's pooled width 32
    torch.testing.assert_close(states, want, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)
    torch.testing.assert_close(stack.encode(PROMPTS[:2]), states, rtol=0, atol=0)
    uncond, uncond_pooled = stack.unconditional()
    assert not want_neg.any() and not want_neg_pooled.any()  # force_zeros_for_empty_prompt
    assert uncond.shape == (1, 77, 64) and not uncond.any() and uncond_pooled.shape == (1, 32)
    assert not uncond_pooled.any()
    # The two tokenizers pad differently (end token vs "!"), so their ids differ after the prompt.
    ids = sdxl.tokenize(stack.tokenizer, ["a photo of a cat"])[0]
    ids_2 = sdxl.tokenize(stack.tokenizer_2, ["a photo of a cat"])[0]
    assert ids[:7].tolist() == ids_2[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:].unique().tolist() == [49407] and ids_2[7:].unique().tolist() == [0]


def test_unconditional_branch_without_forced_zeros_is_the_empty_prompt(teacher, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    stack = load_text_stack(folder)
    uncond, uncond_pooled = stack.unconditional()
    empty, empty_pooled = stack.encode_pooled([""])
    assert uncond.abs().max() > 0
    torch.testing.assert_close(uncond, empty, rtol=0, atol=0)
    torch.testing.assert_close(uncond_pooled, empty_pooled, rtol=0, atol=0)


def test_teacher_sampler_is_the_sdxl_pipeline(teacher, diffusers_pipe):
    """boot.samplers.TeacherSampler (the sample grids' and evaluation's teacher) == diffusers'
    StableDiffusionXLPipeline with DDIM: time ids (64, 64, 0, 0, 64, 64), pooled, zero negatives."""
    from boot.samplers import TeacherSampler, seed_noise

    sampler = TeacherSampler(teacher, 3, 4.0)
    assert sampler.time_ids.tolist() == [64, 64, 0, 0, 64, 64]
    seeds = [0, 7]
    latents = seed_noise(seeds, sampler.latent_shape, 1.0)
    want = diffusers_pipe(PROMPTS[:2], latents=latents, num_inference_steps=3, guidance_scale=4.0,
                          output_type="np").images
    got = _arrays(sampler(PROMPTS[:2], seeds, 4.0))
    assert np.array_equal(got, (want * 255).round().astype(np.int16))


# --------------------------------------------------------------------------------------------
# distill.run -> student -> BootPipeline -> export -> OnnxPipeline -> tritonserver
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdxl-run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    return run.main(["--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2", "--batch-size", "2",
                     "--warmup", "0", "--lr", "1e-3", "--sample-every", "0", "--guidance-max", "4",
                     "--out", str(root / "student"), "--work", str(root / "work")])


def test_distilled_student_folder(student):
    from boot_serve import BootPipeline

    meta = json.loads((student / "boot.json").read_text())
    assert meta["prediction_type"] == "epsilon" and meta["latent_shape"] == [4, 8, 8]
    assert meta["added_conditioning"] == {"type": "text_time", "time_ids": [64, 64, 0, 0, 64, 64],
                                          "text_embeds_size": 32}
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"):
        assert (student / part).is_dir(), part
    pipe = BootPipeline.from_pretrained(student)
    assert pipe.generator.student.time_ids.tolist() == [64, 64, 0, 0, 64, 64]
    a, b = _arrays(pipe(PROMPTS[:2], [3, 3], 2.0))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() > 0  # the prompt reaches the image
    # ... through the pooled embedding too, not only the token states.
    states, pooled = pipe.encode_prompt_pooled(PROMPTS[:1])
    noise, w = pipe.noise([3]), torch.full((1,), 2.0)
    with torch.no_grad():
        moved = pipe.generator(noise, states, w, torch.zeros_like(pooled)) - pipe.generator(noise, states, w, pooled)
    assert moved.abs().max() > 1e-4


def test_student_runs_in_plain_diffusers_as_in_boot_pipeline(student):
    """The student folder is a StableDiffusionXLPipeline folder: one step of diffusers' own SDXL pipeline
    (its time ids, pooled embeddings and guidance embedding) gives BootPipeline's image."""
    from diffusers import StableDiffusionXLPipeline

    from boot_serve import BootPipeline

    boot_pipe = BootPipeline.from_pretrained(student)
    pipe = StableDiffusionXLPipeline.from_pretrained(student, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for w in (1.0, 2.5, 4.0):
        want = _arrays(boot_pipe(PROMPTS[:1], [3], w))
        got = pipe(PROMPTS[:1], latents=boot_pipe.noise([3]), num_inference_steps=1, guidance_scale=w,
                   output_type="np").images
        assert np.abs((got * 255).round().astype(np.int16) - want).max() <= 1, w


@pytest.fixture(scope="module")
def repository(student, tmp_path_factory) -> tuple[Path, dict]:
    from boot_serve import export

    repo = tmp_path_factory.mktemp("sdxl-repo") / "model_repository"
    return repo, export.export(student, repo, parity_batches=(1, 2), e2e_prompts=2)


def test_export_carries_pooled_embeddings_and_time_ids(repository):
    repo, info = repository
    assert info["tokenizer_2"] == "text_encoder/1/tokenizer_2" and info["text_embeds_size"] == 32
    assert info["time_ids"] == [64, 64, 0, 0, 64, 64] and info["hidden_size"] == 64 and info["max_length"] == 77
    graphs = info["graphs"]
    assert [t["name"] for t in graphs["text_encoder"]["inputs"]] == ["input_ids", "input_ids_2"]
    assert [(t["name"], t["shape"]) for t in graphs["text_encoder"]["outputs"]] == [
        ("text_states", ["B", 77, 64]), ("text_embeds", ["B", 32])]
    assert [t["name"] for t in graphs["boot_unet"]["inputs"]] == ["noise", "text_states", "guidance_scale",
                                                                  "text_embeds"]
    assert info["parity"]["end_to_end"]["image"]["max_abs"] <= TOLERANCE
    assert info["parity"]["tokenizer"]["identical"]


@pytest.mark.parametrize("variant", ["cpu-ensemble", "cpu-onehop"])
def test_onnx_and_served_images_equal_the_pytorch_students(student, repository, variant, tmp_path):
    from boot_serve import BootPipeline, triton_repo
    from boot_serve.client import Client
    from boot_serve.onnx_pipeline import OnnxPipeline
    from boot_serve.triton_server import TritonServer

    exported, _ = repository
    repo = tmp_path / "model_repository"
    shutil.copytree(exported, repo)
    triton_repo.write_configs(repo, variant)
    prompts, seeds, w = PROMPTS[1:4], [0, 2**63 - 1, 12345], 3.0
    ref = _arrays(BootPipeline.from_pretrained(student)(prompts, seeds, w))
    onnx = _arrays(OnnxPipeline.from_pretrained(repo)(prompts, seeds, w))
    assert np.abs(onnx - ref).max() <= TOLERANCE
    server = TritonServer(repo, exit_timeout=5, log_path=tmp_path / "tritonserver.log")
    server.start()
    try:
        with Client(server.http_url) as client:
            served = _arrays(client.generate(prompts, seeds, w))
            with pytest.raises(ValueError, match="tokens long"):  # preprocess still rejects over-long prompts
                client.generate(["a cat " * 80], [0], w)
    finally:
        server.stop()
    assert np.abs(served - onnx).max() <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # (loaders' progress bars aside)
    return line


def test_text_time_unet_without_a_second_text_encoder_is_refused(teacher, tmp_path, capsys):
    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    (tmp_path / "p.txt").write_text("a cat\n")
    err = _refused(["--teacher", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"),
                    "--work", str(tmp_path / "w")], capsys)
    assert "'text_time' added conditioning" in err and "text_encoder_2" in err


def test_added_embedding_width_not_matching_the_pooled_width_is_refused(teacher, tmp_path, capsys):
    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)  # a second encoder whose projection (48) does not fit the UNet's add_embedding (32 + 6x8)
    CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "projection_dim": 48})).save_pretrained(
        folder / "text_encoder_2")
    (tmp_path / "p.txt").write_text("a cat\n")
    err = _refused(["--teacher", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"),
                    "--work", str(tmp_path / "w")], capsys)
    assert "projection_class_embeddings_input_dim 80 != pooled width 48" in err


# --------------------------------------------------------------------------------------------
# Convergence
# --------------------------------------------------------------------------------------------
def test_twenty_steps_lower_the_bootstrap_loss_and_raise_psnr(teacher, tmp_path):
    """The tiny SDXL fixture with its prediction type switched to v-prediction: 20 steps at batch 8 lower
    the bootstrap loss (mean of the last 5 steps below the first 5) and raise the sample PSNR against the
    teacher's 50 DDIM steps, through both encoders' states, the pooled embedding and the time ids.
    Measured (2-core AMD EPYC CPU): 0.125 -> 0.103, 15.6 -> 18.4 dB.

    The folder as written (epsilon, random weights) is no test of convergence: a random-weight epsilon
    UNet does not predict the noise (its output at T correlates -0.007 with ε), so its x0 at T is about ε/α_T
    (standard deviation 15.5, α_T = 0.068) and there is no image to approach (the same recipe: bootstrap
    loss 19.7 -> 16.0, sample PSNR 30.2 -> 26.2 dB). Epsilon
    teachers are checked on a copy first trained to denoise (the per-family convergence tests)."""
    prediction_type = "v_prediction"
    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": prediction_type}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    work = tmp_path / "work"
    run.main(["--teacher", str(folder), "--prompts", str(prompts), "--steps", "20", "--batch-size", "8",
              "--warmup", "0", "--lr", "3e-4", "--ema", "0", "--sample-every", "20", "--max-minutes", "0",
              "--out", str(tmp_path / "student"), "--work", str(work)])
    bootstrap = [json.loads(line)["bootstrap"] for line in (work / "loss.jsonl").read_text().splitlines()]
    psnr = [json.loads(line)["psnr_vs_teacher"] for line in (work / "samples.jsonl").read_text().splitlines()]
    assert len(bootstrap) == 20 and len(psnr) == 2
    assert np.mean(bootstrap[-5:]) < np.mean(bootstrap[:5])
    assert psnr[-1] > psnr[0]
