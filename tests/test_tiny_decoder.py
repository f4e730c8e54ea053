"""The data-free tiny decoder (`python -m distill.tiny_decoder`, boot.decoders) on a tiny random student:
- it trains on the student's own latents and writes a diffusers AutoencoderTiny folder sized to the student's
  VAE (latent channels, scaling factor, upsampling), with tiny_decoder.json (teacher, steps, losses,
  measurements), samples.png and loss.png; plain diffusers loads it and BootPipeline decodes with it;
- a run stopped and resumed from its checkpoint ends with the weights of an uninterrupted run; checkpoints of
  an earlier run are not overwritten without --resume;
- a tiny decoder whose latent channels or scaling factor differ from the student's is refused in one line
  naming both values, exit 2: at load (--check, BootPipeline use) and when it is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boot.decoders import DecoderMismatch, check_fits, load_tiny_decoder

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--pool", "24", "--held-out", "6", "--batch-size", "4", "--channels", "8", "--blocks", "1,1",
         "--checkpoint-every", "3", "--timing-rounds", "1", "--threads", "1", "--warmup", "2"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill.tiny_decoder", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_student, make_tiny_teacher

    root = tmp_path_factory.mktemp("tiny-decoder")
    return make_tiny_student(make_tiny_teacher(root / "teacher"), root / "student")


@pytest.fixture(scope="module")
def trained(student, tmp_path_factory) -> tuple[Path, Path]:
    """6 steps in one go: (the tiny decoder folder, its work folder)."""
    root = tmp_path_factory.mktemp("trained")
    proc = _cli("--student", str(student), "--out", str(root / "out"), "--work", str(root / "work"),
                "--steps", "6", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out", root / "work"


def _vae_config(student: Path) -> dict:
    return json.loads((student / "vae" / "config.json").read_text())


def test_writes_a_diffusers_folder_sized_to_the_students_vae(student, trained):
    from diffusers import AutoencoderTiny

    out, work = trained
    vae = _vae_config(student)
    tiny = AutoencoderTiny.from_pretrained(out, use_safetensors=True)  # plain diffusers
    assert tiny.config.latent_channels == vae["latent_channels"]
    assert tiny.config.scaling_factor == vae["scaling_factor"]
    z = torch.randn(2, vae["latent_channels"], 8, 8)
    assert tiny.decode(z).sample.shape == (2, 3, 16, 16)  # the VAE's upsampling: 2 levels, x2
    meta = json.loads((out / "tiny_decoder.json").read_text())
    assert meta["format"] == "boot-tiny-decoder/1" and meta["student"] == str(student)
    assert meta["teacher"] == json.loads((student / "boot.json").read_text())["teacher"]
    assert meta["latents"]["source"] == "student"
    assert meta["recipe"]["steps"] == 6 and meta["losses"]["l1"] == 1.0 and meta["losses"]["mse"] == 1.0
    assert meta["latent_channels"] == vae["latent_channels"] and meta["scaling_factor"] == vae["scaling_factor"]
    measured = meta["measured"]
    assert measured["psnr_tiny_vs_full_db"]["images"] == 6 and measured["hardware"]["cpu"]
    for key in ("full_torch", "tiny_torch", "full_onnxruntime", "tiny_onnxruntime"):
        assert measured["decoder_ms_batch1"][key]["p50_ms"] > 0
    for name in ("samples.png", "loss.png", "diffusion_pytorch_model.safetensors"):
        assert (out / name).is_file(), name
    assert len((work / "loss.jsonl").read_text().splitlines()) >= 1


def test_boot_pipeline_decodes_with_it(student, trained):
    from boot.pipeline import BootPipeline

    out, _ = trained
    pipe = BootPipeline.from_pretrained(student)
    full = pipe(["a red circle"], [3])
    pipe.vae = load_tiny_decoder(out, pipe.vae.config)
    tiny = pipe(["a red circle"], [3])
    assert tiny[0].size == full[0].size == (16, 16)


def test_resumed_run_equals_an_uninterrupted_one(student, trained, tmp_path):
    from safetensors.torch import load_file

    out, work = tmp_path / "out", tmp_path / "work"
    base = ["--student", str(student), "--out", str(out), "--work", str(work), *SMALL]
    first = _cli(*base, "--steps", "6", "--max-minutes", "0.000001")  # a checkpoint after the first step
    assert first.returncode == 0, first.stderr[-3000:]
    assert not out.exists() and any((work / "checkpoints").iterdir())
    again = _cli(*base, "--steps", "6")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _cli(*base, "--steps", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(trained[0] / "diffusion_pytorch_model.safetensors"))
    decoder = [k for k in a if k.startswith("decoder.")]
    assert decoder and all(torch.allclose(a[k], b[k], atol=1e-6) for k in decoder)


def _foreign(folder: Path, trained: Path, **changes) -> Path:
    """A copy of the trained tiny decoder whose config says other latents."""
    import shutil

    shutil.copytree(trained, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change, message", [
    ({"latent_channels": 8}, r"latent_channels 8 \(student's VAE: 4\)"),
    ({"scaling_factor": 0.5}, r"scaling_factor 0.5 \(student's VAE: 1.0\)"),
], ids=["latent_channels", "scaling_factor"])
def test_a_tiny_decoder_of_other_latents_is_refused_at_load(student, trained, tmp_path, change, message):
    import re

    folder = _foreign(tmp_path / "foreign", trained[0], **change)
    proc = _cli("--student", str(student), "--check", str(folder))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: tiny decoder") and re.search(message, lines[-1]), proc.stderr
    with pytest.raises(DecoderMismatch, match=message):
        load_tiny_decoder(folder, _vae_config(student))
    ok = _cli("--student", str(student), "--check", str(trained[0]))
    assert ok.returncode == 0 and "fits" in ok.stdout


def test_a_tiny_decoder_of_other_latents_is_refused_when_written(student, tmp_path):
    from diffusers import AutoencoderKL

    from distill.tiny_decoder.report import write_folder
    from distill.tiny_decoder.train import build_tiny

    vae = AutoencoderKL.from_pretrained(student / "vae", use_safetensors=True)
    tiny = build_tiny(vae.config, 8, (1, 1))
    tiny.register_to_config(scaling_factor=0.5)
    with pytest.raises(DecoderMismatch, match=r"scaling_factor 0.5 \(student's VAE: 1.0\)") as err:
        write_folder(tiny, tmp_path / "out", {}, vae.config)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_check_fits_names_every_difference_on_one_line():
    with pytest.raises(DecoderMismatch) as err:
        check_fits({"latent_channels": 16, "scaling_factor": 0.5}, {"latent_channels": 4, "scaling_factor": 0.3})
    text = str(err.value)
    assert "latent_channels 16 (student's VAE: 4)" in text and "scaling_factor 0.5 (student's VAE: 0.3)" in text
    assert "\n" not in text
    check_fits({"latent_channels": 4, "scaling_factor": 0.3, "shift_factor": 0.0}, {"latent_channels": 4,
                                                                                     "scaling_factor": 0.3})


def test_learning_rate_is_a_function_of_the_step():
    from distill.tiny_decoder.train import Recipe, learning_rate

    r = Recipe(student="s", steps=100, warmup=10, lr=1e-3)
    assert learning_rate(r, 0) == pytest.approx(1e-4) and learning_rate(r, 9) == pytest.approx(1e-3)
    assert learning_rate(r, 99) == pytest.approx(5e-5, rel=0.05)
    assert np.all(np.diff([learning_rate(r, s) for s in range(10, 100)]) <= 0)


# --------------------------------------------------------------------------------------------
# Export and serving: `boot_serve.export --decoder tiny`, both CPU variants
# --------------------------------------------------------------------------------------------
def _export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "boot_serve.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def test_export_refuses_a_tiny_decoder_of_other_latents(student, trained, tmp_path):
    folder = _foreign(tmp_path / "foreign", trained[0], latent_channels=8)
    proc = _export("--student", str(student), "--repository", str(tmp_path / "repo"), "--decoder", "tiny",
                   "--tiny-decoder", str(folder))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "latent_channels 8 (student's VAE: 4)" in last and last.startswith("error:")
    assert not (tmp_path / "repo" / "manifest.json").exists()


def test_every_cpu_variant_serves_the_tiny_decoder(student, trained, tmp_path):
    import shutil

    from boot.pipeline import BootPipeline
    from boot_serve import triton_repo
    from boot_serve.client import Client
    from boot_serve.onnx_pipeline import OnnxPipeline
    from boot_serve.triton_server import TritonServer

    repo = tmp_path / "onehop" / "model_repository"
    proc = _export("--student", str(student), "--repository", str(repo), "--decoder", "tiny",
                   "--tiny-decoder", str(trained[0]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["decoder"]["kind"] == "tiny" and manifest["parity"]["end_to_end"]["image"]["max_abs"] <= 2
    reference = BootPipeline.from_pretrained(student)
    full = np.stack([np.asarray(im) for im in reference(["a red circle", "two blue squares"], [4, 5])])
    reference.vae = load_tiny_decoder(trained[0], reference.vae.config)
    prompts, seeds = ["a red circle", "two blue squares"], [4, 5]
    expected = np.stack([np.asarray(im) for im in reference(prompts, seeds)])
    assert not np.array_equal(expected, full)  # the tiny decoder is what decodes
    onnx = np.stack([np.asarray(im) for im in OnnxPipeline.from_pretrained(repo)(prompts, seeds)])
    ensemble = tmp_path / "ensemble" / "model_repository"
    shutil.copytree(repo, ensemble)
    triton_repo.write_configs(ensemble, "cpu-ensemble")
    for path in (repo, ensemble):
        with TritonServer(path, exit_timeout=5) as server, Client(server.http_url, "http") as client:
            served = np.stack([np.asarray(im) for im in client.generate(prompts, seeds)])
        assert np.array_equal(served, onnx), triton_repo.served_variant(path)
        assert int(np.abs(served.astype(int) - expected).max()) <= 2, triton_repo.served_variant(path)
