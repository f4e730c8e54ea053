"""Memory of an SD-scale distillation run: text states, the refine-target chunk, EMA placement.

Text states: SD-1.5's are 77×768 per prompt, 236 KB in fp32, 23.6 GB per 100k prompts. PromptStates
holds them per distinct prompt in fp32 (the default), in fp16 (half that; the UNet's cross-attention
reads them through autocast anyway), or not at all: "on-the-fly" encodes each batch's prompts with the
frozen text encoder (which then stays on the training device), for prompt files too large to cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

TEXT_STATES = ("fp32", "fp16", "on-the-fly")
CPU_REFINE_CHUNK = 64  # final-hop targets per chunk on the CPU
MAX_REFINE_CHUNK = 1024
BUDGET_FRACTION = 0.8  # of the free GPU memory, when no budget is given


class PromptStates:
    """c for a batch of prompt indices: (B, L, D) fp32 on `device`, cached or encoded per batch; with
    text stacks that give pooled embeddings (SDXL family), `pooled(prompt)` gives them, (B, P), alike."""

    def __init__(self, text, prompts: list[str], mode: str = "fp32", device: torch.device | str = "cpu",
                 chunk: int = 256):
        if mode not in TEXT_STATES:
            raise ValueError(f"text states must be one of {TEXT_STATES}, got {mode!r}")
        self.text, self.mode, self.device = text, mode, torch.device(device)
        self.distinct = sorted(set(prompts))
        index = {p: i for i, p in enumerate(self.distinct)}
        self.rows = torch.tensor([index[p] for p in prompts])  # (N,) row of each prompt
        self.table = None  # (N_distinct, L, D) on the CPU, or None when encoded on the fly
        self.pooled_table = None  # (N_distinct, P) beside it for text stacks with pooled embeddings
        self.has_pooled = bool(getattr(text, "pooled", False))
        if mode != "on-the-fly":
            dtype = torch.float16 if mode == "fp16" else torch.float32
            with torch.no_grad():
                parts = [text.encode_pooled(self.distinct[i:i + chunk]) for i in range(0, len(self.distinct), chunk)]
            self.table = torch.cat([s.float().to(dtype).cpu() for s, _ in parts])
            if parts[0][1] is not None:
                self.pooled_table = torch.cat([p.float().cpu() for _, p in parts])

    def __call__(self, prompt: torch.Tensor) -> torch.Tensor:
        rows = self.rows[prompt.cpu()]
        if self.table is None:
            with torch.no_grad():
                return self.text.encode([self.distinct[i] for i in rows.tolist()]).float().to(self.device)
        return self.table[rows].to(self.device).float()

    def pooled(self, prompt: torch.Tensor) -> torch.Tensor | None:
        """(B, P) fp32 pooled embeddings of the prompts, or None for text stacks without them."""
        if not self.has_pooled:
            return None
        rows = self.rows[prompt.cpu()]
        if self.table is None:
            with torch.no_grad():
                return self.text.encode_pooled([self.distinct[i] for i in rows.tolist()])[1].float().to(self.device)
        return self.pooled_table[rows].to(self.device)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (0 on the fly)."""
        return 0 if self.table is None else self.table.numel() * self.table.element_size()


def chunk_for_budget(per_sample_bytes: float, budget_bytes: float, cap: int = MAX_REFINE_CHUNK) -> int:
    """Largest chunk whose peak memory, at `per_sample_bytes` each, fits `budget_bytes` (at least 1)."""
    return int(max(1, min(cap, budget_bytes // max(per_sample_bytes, 1.0))))


def refine_chunk(flag: int, budget_gb: float, device: torch.device, probe: Callable[[int], object]) -> int:
    """Samples per refine-target chunk: --refine-chunk if given; on a GPU, from the peak memory of
    `probe(2)` (one chunk of 2 targets) against --memory-budget GB (or 80% of the free memory);
    on the CPU, CPU_REFINE_CHUNK. Targets do not depend on the chunk (each sample is computed alone)."""
    if flag:
        return flag
    if device.type != "cuda":
        return CPU_REFINE_CHUNK
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe(2)
    torch.cuda.synchronize(device)
    per_sample = (torch.cuda.max_memory_allocated(device) - base) / 2
    budget = budget_gb * 2**30 if budget_gb else BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0]
    return chunk_for_budget(per_sample, budget)


@contextlib.contextmanager
def placed(module: torch.nn.Module | None, device: torch.device) -> Iterator[None]:
    """Move `module` to `device` for the block, then back where it lives (an EMA kept on the CPU is
    brought to the training device to render samples or validate, and sent back)."""
    if module is None:
        yield
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
