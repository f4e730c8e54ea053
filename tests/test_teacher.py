"""Teacher: text encoder offline, training CLI end to end, sampler == diffusers pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boot import text
from boot.folders import load_teacher_pipeline
from boot.samplers import TeacherSampler
from distill.evaluate import evaluate, seed_noise
from shapes_world import world
from shapes_world.judge import judge
from tests.tiny import make_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "shapes-teacher"


def test_text_encoder_loads_offline_and_fits_the_grammar():
    tok, enc = text.load_tokenizer(), text.load_text_encoder()
    longest = max(world.sample_captions(3000, 0), key=lambda c: len(tok(c).input_ids))
    assert len(tok(longest).input_ids) <= text.MAX_LENGTH
    states = text.encode(["a red circle", ""], tok, enc)
    assert states.shape == (2, text.MAX_LENGTH, text.HIDDEN_SIZE)
    assert not torch.allclose(states[0], states[1])
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("prediction_type,zero_snr,text_kind", [
    ("v_prediction", True, "package"), ("epsilon", False, "folder"),
])
def test_sampler_matches_diffusers_pipeline(tmp_path, prediction_type, zero_snr, text_kind):
    folder = make_tiny_teacher(tmp_path / "t", prediction_type, zero_snr, text_kind)
    pipe = load_teacher_pipeline(folder)
    sampler = TeacherSampler(folder, steps=4, guidance_scale=3.0)
    prompts, seeds = ["a red circle", "a blue square left of a green triangle"], [3, 11]
    latents = seed_noise(seeds, sampler.latent_shape, pipe.scheduler.init_noise_sigma)
    ref = pipe(prompts, latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    ours = np.stack([np.asarray(im) for im in sampler(prompts, seeds)])
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_sampler_is_batch_invariant(tmp_path):
    folder = make_tiny_teacher(tmp_path / "t")
    sampler = TeacherSampler(folder, steps=2, guidance_scale=2.0)
    prompts = ["a red circle", "a white triangle", "a blue square"]
    batch = sampler(prompts, [5, 6, 7])
    alone = sampler(prompts[1:2], [6])[0]
    assert np.abs(np.asarray(batch[1]).astype(int) - np.asarray(alone).astype(int)).max() <= 1


def test_evaluate_reports_attributes(tmp_path):
    class RenderGenerator:  # the renderer itself: a perfect generator for the judge
        name, nfe = "render", 0

        def __call__(self, prompts, seeds, guidance_scale=None):
            return [world.render(p, s) for p, s in zip(prompts, seeds)]

    caps = world.sample_captions(40, 0, "eval")
    res, images = evaluate(RenderGenerator(), caps, list(range(40)))
    assert res.accuracy == 1.0 and res.attributes["color"] == 1.0 and len(images) == 40
    res, _ = evaluate(RenderGenerator(), caps, list(range(40)), reference=images)
    assert res.psnr_vs_reference == float("inf")


def test_report_keeps_per_caption_verdicts(tmp_path):
    import json

    from distill.evaluate import write_report

    class EvenSeedsRight:  # the right picture for even seeds, a black canvas for odd ones
        name, nfe = "even", 1

        def __call__(self, prompts, seeds, guidance_scale=None):
            return [world.render(p, s) if s % 2 == 0 else world.render(p, s).point(lambda v: 0)
                    for p, s in zip(prompts, seeds)]

    caps = world.sample_captions(10, 0, "eval")
    res, images = evaluate(EvenSeedsRight(), caps, list(range(10)))
    write_report([res], {"even": images}, caps, tmp_path, "t")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["captions"] == caps
    assert report["results"][0]["correct"] == [1, 0] * 5 and report["results"][0]["accuracy"] == 0.5


def test_guidance_sweep_reports_the_curve(tmp_path):
    from distill.evaluate import guidance_sweep

    class GuidedRender:  # right picture only at guidance >= 3, a black canvas below
        name, nfe = "guided", 1

        def __call__(self, prompts, seeds, guidance_scale=None):
            if guidance_scale >= 3:
                return [world.render(p, s) for p, s in zip(prompts, seeds)]
            return [world.render(p, s).point(lambda v: 0) for p, s in zip(prompts, seeds)]

    caps = world.sample_captions(12, 1, "eval")
    report = guidance_sweep([GuidedRender()], [1.0, 3.0, 5.0], caps, list(range(12)), tmp_path)
    assert [r["accuracy"] for r in report["generators"]["guided"]] == [0.0, 1.0, 1.0]
    assert "| guided | 0.0 | 100.0 | 100.0 |" in (tmp_path / "guidance.md").read_text()
    assert (tmp_path / "guidance.png").stat().st_size > 0


def test_teacher_training_cli_end_to_end_and_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "shapes_world", "--work", str(tmp_path / "w"), "--out",
            str(tmp_path / "out"), "--dataset-size", "64", "--unet-steps", "2"]
    subprocess.run(base + ["--vae-steps", "2", "--stage", "vae"], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    run = subprocess.run(base + ["--vae-steps", "3"], check=True, cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert "resumed" in run.stdout and "step 2" in run.stdout
    meta = json.loads((tmp_path / "out" / "boot_teacher.json").read_text())
    assert meta["unet_steps_trained"] == 2 and meta["recipe"]["prediction_type"] == "v_prediction"
    assert not (tmp_path / "out" / "text_encoder").exists()  # third-party weights never copied
    assert (tmp_path / "w" / "samples.png").stat().st_size > 0 and "sample grid (16 eval captions" in run.stdout
    pipe = load_teacher_pipeline(tmp_path / "out")
    image = pipe(["a red circle"], num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_teacher_cli_recipe_overrides_reach_the_exported_folder(tmp_path):
    """--set changes the architecture, --workers renders in processes; export rebuilds from the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    attn = '["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"]'
    run = subprocess.run(
        [sys.executable, "-m", "shapes_world", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
         "--dataset-size", "300", "--vae-steps", "1", "--unet-steps", "2", "--workers", "2",
         "--set", "unet_batch=4", "--set", f"unet_down={attn}", "--set", f"unet_up={attn.replace('Down', 'Up')}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "boot_teacher.json").read_text())
    assert meta["recipe"]["unet_batch"] == 4 and meta["recipe"]["unet_down"] == json.loads(attn)
    unet = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == json.loads(attn)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"] and not (tmp_path / "out" / "text_encoder").exists()


@pytest.mark.parametrize("item, message", [
    ("nonsense=1", "unknown recipe field 'nonsense'"),
    ("unet_batch=abc", "unet_batch must be JSON of type int"),
    ("unet_lr=true", "unet_lr must be JSON of type float"),
    ("unet_down=3", "unet_down must be JSON of type tuple"),
])
def test_teacher_cli_refuses_bad_overrides(item, message, capsys, tmp_path):
    from shapes_world.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--work", str(tmp_path), "--set", item])
    assert exc.value.code == 2 and message in capsys.readouterr().err


needs_shipped = pytest.mark.skipif(not (SHIPPED / "unet").is_dir(), reason="shipped teacher not trained yet")


@needs_shipped
def test_shipped_teacher_size_and_recommendations():
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"teacher folder is {total / 2**20:.1f} MB"
    meta = json.loads((SHIPPED / "boot_teacher.json").read_text())
    assert meta["guidance_scale"] > 1 and meta["num_inference_steps"] >= 25


@needs_shipped
def test_shipped_vae_round_trip_keeps_attributes():
    from diffusers import AutoencoderKL

    from shapes_world.teacher import to_model_range

    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", use_safetensors=True).eval()
    caps = world.sample_captions(200, 4242, "eval")
    imgs = np.stack([world.render_array(c, i) for i, c in enumerate(caps)])
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_model_range(imgs)).latent_dist.mean).sample
    rec = ((rec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    ok = sum(judge(c, r) for c, r in zip(caps, rec))
    assert ok >= 0.98 * len(caps), f"round trip kept {ok}/{len(caps)}"


@needs_shipped
def test_shipped_teacher_sampler_matches_diffusers():
    pipe = load_teacher_pipeline(SHIPPED)
    sampler = TeacherSampler(SHIPPED, steps=8)
    latents = seed_noise([0, 1], sampler.latent_shape)
    ref = pipe(["a red circle", "a large blue square at the top"], latents=latents, num_inference_steps=8,
               guidance_scale=sampler.default_guidance, output_type="np").images
    ours = np.stack([np.asarray(i) for i in sampler(["a red circle", "a large blue square at the top"], [0, 1])])
    assert np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 1


@needs_shipped
def test_teacher_init_from_continues_the_shipped_teacher(tmp_path, capsys):
    """--init-from keeps the folder's VAE, latent scale and UNet (lr 0: the export equals the folder)."""
    from safetensors.torch import load_file

    from shapes_world.__main__ import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "shapes_world", "--init-from", str(SHIPPED), "--work", str(tmp_path / "w"),
         "--out", str(tmp_path / "out"), "--dataset-size", "64", "--unet-steps", "2",
         "--set", "unet_batch=2", "--set", "unet_lr=0.0"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "boot_teacher.json").read_text())
    shipped = json.loads((SHIPPED / "boot_teacher.json").read_text())
    assert meta["unet_steps_trained"] == shipped["unet_steps_trained"] + 2
    assert meta["continued_from"] == shipped and meta["recipe"]["init_from"] == str(SHIPPED)
    assert meta["recipe"]["unet_channels"] == shipped["recipe"]["unet_channels"] and meta["recipe"]["unet_batch"] == 2
    for part in ("unet", "vae"):
        new = load_file(str(tmp_path / "out" / part / "diffusion_pytorch_model.safetensors"))
        old = load_file(str(SHIPPED / part / "diffusion_pytorch_model.safetensors"))
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), part
    scale = lambda folder: json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(tmp_path / "out") == scale(SHIPPED)

    with pytest.raises(SystemExit) as exc:
        main(["--init-from", str(SHIPPED), "--work", str(tmp_path / "x"), "--set", "unet_channels=[32,64,64]"])
    assert exc.value.code == 2 and "cannot change unet_channels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--init-from", str(tmp_path), "--work", str(tmp_path / "x")])
    assert exc.value.code == 2 and "not a teacher folder" in capsys.readouterr().err
