"""A compact student: the teacher's UNet with blocks removed, initialised from the kept weights.

BOOT does not need the student to share the teacher's architecture: the student is read through the
same parameterization, so any `UNet2DConditionModel` with the teacher's input and output works. The
compact student takes the teacher's (or a trained student's) UNet and removes whole blocks, by a
named rule, the way BK-SDM removes blocks from SD-1.5; every kept module keeps its name, so its
weights are copied over and training starts from a network that already draws something close.

Rules (apply to any diffusers UNet2DConditionModel):

    no-mid       the mid block (at the lowest resolution: residual blocks + cross-attention) is removed;
                 the last down block feeds the first up block directly.
    no-mid-attn  no-mid, and the cross-attention of the lowest-resolution level that has it is removed
                 (its down and up blocks become plain residual blocks; their resnets and samplers stay).

The text still reaches every other cross-attention layer. The rule is recorded in boot.json
(`"compact"`); the student folder's unet/config.json is the compact architecture itself, so plain
diffusers, the export and the server load it as any other UNet.
"""

from __future__ import annotations

import torch
from torch import nn

RULES = ("no-mid", "no-mid-attn")

_PLAIN = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


class CompactError(ValueError):
    """A rule that does not apply to this UNet."""


def compact_config(config: dict, rule: str) -> dict:
    """The UNet config after `rule` (a plain dict, as `UNet2DConditionModel(**config)` takes)."""
    if rule not in RULES:
        raise CompactError(f"unknown compact rule {rule!r}; choose one of {', '.join(RULES)}")
    config = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items() if not k.startswith("_")}
    if config.get("mid_block_type") is None:
        raise CompactError("this UNet has no mid block to remove (already compact?)")
    config["mid_block_type"] = None
    if rule == "no-mid-attn":
        down, up = config["down_block_types"], config["up_block_types"]
        levels = [i for i, kind in enumerate(down) if kind in _PLAIN]
        if len(levels) < 2:  # keep at least one level where the text enters the network
            raise CompactError("no-mid-attn needs cross-attention at two or more levels; this UNet has "
                               f"{len(levels)}: use no-mid")
        deepest = levels[-1]
        down[deepest] = _PLAIN[down[deepest]]
        mirror = len(up) - 1 - deepest  # up blocks run from the lowest resolution to the highest
        if up[mirror] not in _PLAIN:
            raise CompactError(f"up block {mirror} ({up[mirror]}) does not mirror down block {deepest}")
        up[mirror] = _PLAIN[up[mirror]]
    return config


def compact_unet(unet: nn.Module, rule: str) -> nn.Module:
    """A new UNet2DConditionModel of `compact_config(unet.config, rule)`, holding `unet`'s weights for
    every module it keeps (fp32, on the CPU). Every parameter of the compact UNet must come from `unet`;
    the modules the rule removes are the only ones left behind."""
    from diffusers import UNet2DConditionModel

    small = UNet2DConditionModel(**compact_config(dict(unet.config), rule))
    source = unet.state_dict()
    missing = [k for k in small.state_dict() if k not in source]
    if missing:
        raise CompactError(f"rule {rule!r} left {len(missing)} parameters without a source, e.g. {missing[0]}")
    small.load_state_dict({k: source[k].detach().to("cpu", torch.float32) for k in small.state_dict()})
    return small


def removed_fraction(full: nn.Module, small: nn.Module) -> float:
    """Share of `full`'s parameters that the compact UNet does not have."""
    n_full = sum(p.numel() for p in full.parameters())
    return 1.0 - sum(p.numel() for p in small.parameters()) / n_full
