"""boot.compact: block removal keeps every other module's weights and names, for any UNet layout."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

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
