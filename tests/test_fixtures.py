"""boot_tools.fixtures: the real CLIP tokenizer and random-weight folders of the SD families."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from boot_tools import fixtures


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return fixtures.load_clip_tokenizer(fixtures.write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_clip_tokenizer_known_ids(clip_tokenizer):
    ids = clip_tokenizer("a photo of a cat", padding="max_length", max_length=77)["input_ids"]
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70  # SD-1.5 pads with the end token
    assert len(clip_tokenizer) == fixtures.CLIP_VOCAB_SIZE
    # Case and surrounding whitespace are normalised away, as CLIP's own tokenizer does.
    assert clip_tokenizer("  A Photo of a CAT ")["input_ids"] == ids[:7]


def test_openclip_tokenizer_pads_with_exclamation_mark(tmp_path):
    tok = fixtures.load_clip_tokenizer(fixtures.write_clip_tokenizer(tmp_path, pad_token="!"))
    assert tok("a cat", padding="max_length", max_length=6)["input_ids"] == [49406, 320, 2368, 49407, 0, 0]


def test_byte_symbols_cover_every_byte_once():
    symbols = fixtures.byte_symbols()
    assert len(symbols) == 256 and len(set(symbols)) == 256
    assert symbols[:3] == ["!", '"', "#"] and "Ā" in symbols  # U+0100: the first non-printable byte's stand-in


@pytest.mark.parametrize("arch", fixtures.ARCHS)
def test_tiny_folder_is_a_diffusers_pipeline(arch, tmp_path):
    from diffusers import DiffusionPipeline

    folder = fixtures.make_teacher(arch, "tiny", tmp_path / arch)
    index = json.loads((folder / "model_index.json").read_text())
    expected = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    assert index["_class_name"] == expected
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    assert pipe.tokenizer("a photo of a cat")["input_ids"][:3] == [49406, 320, 1125]
    cross = pipe.unet.config.cross_attention_dim
    width = pipe.text_encoder.config.hidden_size + (pipe.text_encoder_2.config.hidden_size if arch == "sdxl" else 0)
    assert cross == width
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


def test_full_configs_match_published_sizes():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        params = {a: sum(p.numel() for p in UNet2DConditionModel(**fixtures.unet_config(a, "full")).parameters())
                  for a in fixtures.ARCHS}
    assert 855e6 < params["sd15"] < 865e6  # SD-1.5: 859.5M
    assert 860e6 < params["sd2"] < 870e6  # SD-2.x: 865.9M
    assert 2.55e9 < params["sdxl"] < 2.6e9  # SDXL: 2.567B


def test_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "boot_tools.fixtures", "--arch", "sd15", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
