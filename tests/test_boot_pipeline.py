"""BootPipeline (boot/pipeline.py): the noise contract, diffusers' postprocessing, determinism and batch
invariance, input errors, SD-style folders and the recorded parameterization."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.tiny import LATENT, make_tiny_student, make_tiny_teacher


# --------------------------------------------------------------------------------------------
# BootPipeline
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    teacher = make_tiny_teacher(root / "teacher")
    return make_tiny_student(teacher, root / "student", guidance_range=(1.0, 5.0), perturb=0.05)


@pytest.fixture(scope="module")
def pipe(student_folder):
    from boot_serve import BootPipeline

    return BootPipeline.from_pretrained(student_folder)


def _arr(images):
    return np.stack([np.asarray(im).astype(int) for im in images])


def test_pipeline_follows_the_noise_contract_and_diffusers_postprocess(pipe):
    from diffusers.image_processor import VaeImageProcessor

    seeds = [0, 2**63 - 1]
    noise = pipe.noise(seeds)
    for row, seed in zip(noise, seeds):
        ref = np.random.default_rng(seed).standard_normal(LATENT, dtype=np.float32) * pipe.init_noise_sigma
        assert np.array_equal(row.numpy(), ref)
    assert pipe.latent_shape == LATENT and pipe.guidance_range == (1.0, 5.0) and pipe.guidance_scale == 3.0
    prompts = ["a red circle", "a blue square left of a green triangle"]
    latents = pipe.generator(noise, pipe.encode_prompt(prompts), torch.full((2,), 2.0))
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    ref = (VaeImageProcessor().postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)
    assert np.array_equal(pipe.decode(latents), ref)
    images = pipe(prompts, seeds, 2.0)
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    assert np.array_equal(_arr(images), ref.astype(int))


def test_pipeline_is_deterministic_and_batch_invariant(pipe):
    prompts = ["a red circle", "a white triangle at the top", "a blue square", "a red circle"]
    seeds = [5, 6, 7, 8]
    batch = _arr(pipe(prompts, seeds, 2.5))
    assert np.array_equal(batch, _arr(pipe(prompts, seeds, 2.5)))
    for i in range(len(prompts)):
        alone = _arr(pipe([prompts[i]], [seeds[i]], 2.5))[0]
        assert np.abs(batch[i] - alone).max() <= 1, i
    reordered = _arr(pipe(prompts[::-1], seeds[::-1], 2.5))[::-1]
    assert np.abs(batch - reordered).max() <= 1
    pipe.batch_size = 3  # chunked batches give the same images
    try:
        assert np.abs(batch - _arr(pipe(prompts, seeds, 2.5))).max() <= 1
    finally:
        pipe.batch_size = 64
    # ... and the image does depend on the seed, the prompt and the guidance.
    assert np.abs(batch[0] - batch[3]).max() > 1
    assert np.abs(batch[0] - _arr(pipe([prompts[0]], [seeds[0]], 4.5))[0]).max() > 1
    assert np.abs(batch[0] - _arr(pipe([prompts[1]], [seeds[0]], 2.5))[0]).max() > 1


@pytest.mark.parametrize("prompts,seeds,guidance,message", [
    (["a red circle"], [1, 2], None, "1 prompts but 2 seeds"),
    ([], [], None, "non-empty list"),
    ("a red circle", [1], None, "non-empty list"),
    ([""], [1], None, "prompt 0 must be a non-empty string"),
    (["ok", "  "], [1, 2], None, "prompt 1"),
    (["ok"], [-1], None, r"seed 0 must be an integer in \[0, 2\*\*63 - 1\]"),
    (["ok"], [2**63], None, "seed 0"),
    (["ok"], [1.5], None, "seed 0"),
    (["ok"], [True], None, "seed 0"),
    (["ok"], [1], 5.5, r"outside this student's range \[1.0, 5.0\]"),
    (["ok"], [1], 0.5, "outside"),
    (["ok"], [1], float("nan"), "finite"),
    (["ok"], [1], "3", "finite"),
])
def test_pipeline_rejects_bad_inputs(pipe, prompts, seeds, guidance, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompts, seeds, guidance)


def test_pipeline_accepts_numpy_integers_and_range_ends(pipe):
    a = pipe(["a red circle"], [np.int64(3)], np.float32(5.0))
    b = pipe(["a red circle"], [3], 5.0)
    assert np.array_equal(_arr(a), _arr(b))
    assert len(pipe(["a red circle"], [3], 1.0)) == 1


def test_pipeline_loads_sd_style_folder_and_rejects_non_students(tmp_path, student_folder):
    from boot.pipeline import BootPipeline

    teacher = make_tiny_teacher(tmp_path / "t", "epsilon", False, "folder")
    folder = make_tiny_student(teacher, tmp_path / "s")
    pipe = BootPipeline.from_pretrained(folder)
    assert pipe.text.encode(["a red circle"]).shape == (1, 16, 32)
    assert np.asarray(pipe(["a red circle"], [0])[0]).shape == (16, 16, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BootPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="boot.json"):
        BootPipeline.from_pretrained(teacher)
    shutil.rmtree(folder / "vae")  # a latent student without its VAE would return latents as "images"
    with pytest.raises(FileNotFoundError, match="no vae/ folder, but its UNet makes 4-channel latents"):
        BootPipeline.from_pretrained(folder)


def test_pipeline_reads_the_recorded_parameterization(tmp_path, student_folder):
    """boot.json's `parameterization` decides how the loaded student reads its UNet; unknown ones fail."""
    from boot.pipeline import BootPipeline

    folder = tmp_path / "direct"
    shutil.copytree(student_folder, folder)
    meta = json.loads((folder / "boot.json").read_text())
    default = BootPipeline.from_pretrained(student_folder)
    assert default.generator.student.parameterization == "teacher-at-T"  # absent: the default
    for name in ("direct", "unet-at-t"):
        (folder / "boot.json").write_text(json.dumps({**meta, "parameterization": name,
                                                      **({"input_timestep": None} if name == "unet-at-t" else {})}))
        pipe = BootPipeline.from_pretrained(folder)
        assert pipe.generator.student.parameterization == name
        assert not np.array_equal(_arr(pipe(["a red circle"], [3])), _arr(default(["a red circle"], [3])))
    (folder / "boot.json").write_text(json.dumps({**meta, "parameterization": "x0-at-t"}))
    with pytest.raises(ValueError, match="parameterization 'x0-at-t' is not one of"):
        BootPipeline.from_pretrained(folder)
