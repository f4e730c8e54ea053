"""LoRA students (distill.run --lora-rank R): low-rank adapters (peft) on a frozen copy of the teacher UNet.

Trained: the adapters' A and B matrices and the student's conditioning projection
(`time_embedding.cond_proj`, boot.method.add_condition_projection); every teacher weight stays
frozen. B starts at zero, so a LoRA student starts exactly as the full student does (the teacher at T).
The saved student is merged, W + (α/r)·B·A per adapted layer, into a plain diffusers UNet: the
student folder, its export and serving are the same as a fully fine-tuned student's.
"""

from __future__ import annotations

import copy

from torch import nn

# The adapted layers: attention and feed-forward projections, ResNet convolutions, the time-embedding
# projections of each ResNet block and the resamplers (the module set LCM-LoRA adapts in SD-1.5).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TRAINED_ALWAYS = ("time_embedding.cond_proj.",)


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze `unet` and inject rank-`rank` adapters (B = 0) into TARGET_MODULES; the conditioning
    projection stays trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(TARGET_MODULES),
                        init_lora_weights=True, lora_dropout=0.0)
    unet = inject_adapter_in_model(config, unet)
    for name, param in unet.named_parameters():
        param.requires_grad_(is_trained(name))
    return unet


def is_trained(name: str) -> bool:
    """A parameter a LoRA student trains: an adapter matrix or the conditioning projection."""
    return ".lora_A." in name or ".lora_B." in name or name.startswith(TRAINED_ALWAYS)


def has_lora(unet: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def merged(unet: nn.Module) -> nn.Module:
    """A copy of `unet` with every adapter merged into its base layer and removed: a plain diffusers UNet."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(unet)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    out.requires_grad_(True)
    return out
