"""torch.distributed for distill.run: one process, or torchrun's (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # TF32 matmuls and convolutions, as the shapes teacher trains (shapes_world); the GPU refinements that made the
        # shipped student ran with them (docs/ablations.md, the GPU-scale refinement).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        # Long timeout: rank 0 renders the teacher reference while the others wait.
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, dev)


def all_mean(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        torch.distributed.all_reduce(values)
        values = values / dist.world
    return values

