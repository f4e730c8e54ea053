"""boot.compact: block removal keeps every other module's weights and names, for any UNet layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from boot.compact import CompactError, compact_config, compact_unet, removed_fraction

SD15_LIKE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=16,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=4, norm_num_groups=8, sample_size=16)
SHAPES_LIKE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=16,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=4, norm_num_groups=8, sample_size=16)


def unet(layout: dict) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**layout).eval()


@pytest.mark.parametrize("layout", [SHAPES_LIKE, SD15_LIKE], ids=["shapes", "sd15"])
@pytest.mark.parametrize("rule", ["no-mid", "no-mid-attn"])
def test_kept_modules_keep_their_names_and_weights(layout, rule):
    full = unet(layout)
    small = compact_unet(full, rule)
    assert small.mid_block is None
    kept = small.state_dict()
    assert kept and all(torch.equal(v, full.state_dict()[k]) for k, v in kept.items())
    assert 0.05 < removed_fraction(full, small) < 0.6
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert small(x, torch.tensor([10, 900]), e).sample.shape == x.shape


def test_no_mid_attn_removes_the_deepest_attention_level_and_its_mirror():
    config = compact_config(dict(unet(SD15_LIKE).config), "no-mid-attn")
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert config["mid_block_type"] is None


def test_rules_that_do_not_apply_are_refused():
    with pytest.raises(CompactError, match="unknown compact rule"):
        compact_config(dict(unet(SHAPES_LIKE).config), "half")
    small = compact_unet(unet(SHAPES_LIKE), "no-mid")
    with pytest.raises(CompactError, match="no mid block"):
        compact_unet(small, "no-mid")
    one_level = dict(SHAPES_LIKE, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    with pytest.raises(CompactError, match="two or more levels"):
        compact_unet(unet(one_level), "no-mid-attn")


# --------------------------------------------------------------------------------------------
# distill.run --compact: a compact student from the teacher, and from a full student
# --------------------------------------------------------------------------------------------
RUN = ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--ema", "0.5", "--max-minutes", "0",
       "--checkpoint-every", "2", "--sample-every", "2", "--delta", "100", "--seed", "3", "--eval-n", "0"]


def distil(tmp: Path, teacher: Path, name: str, *extra: str) -> Path:
    from distill import run

    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle\na blue square at the top\na green triangle left of a white circle\n")
    out = tmp / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run.main(["--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out),
                  "--work", str(tmp / f"{name}-work"), *RUN, *extra])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    from tests.tiny import make_tiny_teacher

    tmp = tmp_path_factory.mktemp("compact")
    teacher = make_tiny_teacher(tmp / "teacher")
    return tmp, teacher, distil(tmp, teacher, "full"), distil(tmp, teacher, "small", "--compact", "no-mid")


def test_a_compact_student_is_written_loaded_and_run_like_any_other(students):
    from boot.pipeline import BootPipeline

    _, teacher, full, small = students
    meta = json.loads((small / "boot.json").read_text())
    assert meta["compact"] == "no-mid" and meta["hyperparameters"]["compact"] == "no-mid"
    assert json.loads((small / "unet" / "config.json").read_text())["mid_block_type"] is None
    assert "compact" not in json.loads((full / "boot.json").read_text())
    n_full, n_small = (sum(v.numel() for v in load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors"))
                           .values()) for f in (full, small))
    assert n_small < 0.95 * n_full
    pipe = BootPipeline.from_pretrained(small)
    images = np.stack([np.asarray(im) for im in pipe(["a red circle", "a blue square"], [0, 1], guidance_scale=3.0)])
    assert images.shape == (2, 16, 16, 3)
    # plain diffusers runs the compact folder as it runs any student: the same images within one level
    from diffusers import StableDiffusionPipeline

    from tests.test_diffusers_compat import diffusers_images, load

    plain = load(StableDiffusionPipeline, small)
    assert plain.unet.mid_block is None
    got = diffusers_images(plain, ["a red circle", "a blue square"], pipe.noise([0, 1]), 3.0)
    assert np.abs(got.astype(int) - images.astype(int)).max() <= 1


def test_a_full_student_made_compact_starts_from_its_kept_weights(students):
    from boot.method import NoiseSchedule
    from distill.loading import build_student, load_teacher

    tmp, teacher_dir, full, small = students
    teacher = load_teacher(str(teacher_dir))
    schedule = NoiseSchedule.from_scheduler_config(teacher.scheduler_config)
    made = build_student(teacher, schedule, str(full), compact="no-mid").unet.state_dict()
    trained = build_student(teacher, schedule, str(full)).unet.state_dict()
    assert made and all(torch.equal(v, trained[k]) for k, v in made.items())
    assert any(k.startswith("mid_block.") for k in trained) and not any(k.startswith("mid_block.") for k in made)
    # a compact student continues only as the compact student it is
    with pytest.raises(ValueError, match="compact student"):
        build_student(teacher, schedule, str(small))
    continued = build_student(teacher, schedule, str(small), compact="no-mid").unet.state_dict()
    assert continued.keys() == made.keys()


def test_no_mid_attn_is_refused_for_a_teacher_with_one_attention_level(students, capsys):
    tmp, teacher, _, _ = students
    with pytest.raises(SystemExit):
        distil(tmp, teacher, "refused", "--compact", "no-mid-attn")
    assert "no-mid-attn needs cross-attention at two or more levels" in capsys.readouterr().err
