"""Precision of a distillation run: the autocast dtype, and the dtype the frozen teacher is held in.

Published teacher folders are mostly stored in fp16. Whatever the folder holds, the run casts on load:
the teacher UNet to --teacher-dtype (by default the run's autocast dtype, fp32 without mixed
precision), the VAE and text encoder to fp32 (small, and an fp16 VAE decoder overflows on some
latents); the student's weights are always fp32 (AdamW master weights), computed under autocast.
Every UNet output is cast to fp32 before it is read (boot.method.Student, TeacherX0).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TEACHER_DTYPES = ("auto", *DTYPES)


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """--mixed-precision -> the autocast dtype (None: no autocast)."""
    return MIXED_PRECISION[mixed_precision]


def teacher_dtype(flag: str, mixed_precision: str) -> torch.dtype:
    """--teacher-dtype: fp32/fp16/bf16 as given; auto = the autocast dtype, fp32 without mixed precision."""
    if flag == "auto":
        return autocast_dtype(mixed_precision) or torch.float32
    return DTYPES[flag]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def autocast(device: torch.device, mixed_precision: str):
    """The training forwards' autocast context (a no-op context without mixed precision)."""
    dtype = autocast_dtype(mixed_precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
