"""Torch-free pieces shared by the ONNX pipeline, export and the Triton models.

- the client contract (docs/interfaces.md): input validation and the seed -> noise rule,
  in numpy only, so that a Triton Python-backend model can import them without PyTorch;
- ONNX Runtime execution-provider selection that asks for CUDA / TensorRT only when a GPU
  and the libraries they load are really there. `onnxruntime-gpu` lists both providers on
  every machine; asking for them without a GPU makes every session print CUDA load errors
  before it falls back to the CPU.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from numbers import Integral, Real

import numpy as np

MAX_SEED = 2**63 - 1
# Opt in to ORT's TensorRT execution provider (it builds engines at session start: minutes).
TENSORRT_ENV = "BOOT_ORT_TENSORRT"


# --------------------------------------------------------------------------------------------
# Client contract
# --------------------------------------------------------------------------------------------
def check_inputs(prompts, seeds, guidance_scale, default_guidance: float,
                 guidance_range: tuple[float, float]) -> float:
    """Raise ValueError for anything outside the client contract; return the guidance scale.

    The same rules and messages as `BootPipeline.check_inputs`: a non-empty list of non-empty
    prompts, one integer seed in [0, 2**63 - 1] per prompt, a finite guidance inside the
    student's range (None: the student's recommended value).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise ValueError("seeds must be a list of integers")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; one seed per prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} must be a non-empty string, got {p!r}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, Integral) or not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seed {i} must be an integer in [0, 2**63 - 1], got {s!r}")
    w = default_guidance if guidance_scale is None else guidance_scale
    if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    lo, hi = guidance_range
    if not lo <= float(w) <= hi:
        raise ValueError(f"guidance_scale {float(w)} is outside this student's range [{lo}, {hi}]")
    return float(w)


class ChunkedCall:
    """`pipe(prompts, seeds, guidance_scale=None) -> list[PIL.Image]` for a pipeline with
    `check_inputs`, `latents`, `decode` and `batch_size`: validate everything first, then run
    in chunks of `batch_size` (images do not depend on the chunking)."""

    def __call__(self, prompts, seeds, guidance_scale=None):
        from PIL import Image

        self.check_inputs(prompts, seeds, guidance_scale)
        images = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk = slice(lo, lo + self.batch_size)
            arrays = self.decode(self.latents(list(prompts[chunk]), list(seeds[chunk]), guidance_scale))
            images += [Image.fromarray(a) for a in arrays]
        return images


def seed_noise(seeds, latent_shape: tuple[int, ...], init_noise_sigma: float = 1.0) -> np.ndarray:
    """(B, C, h, w) float32 initial latents: one PCG64 stream per seed (docs/interfaces.md)."""
    noise = np.stack([np.random.default_rng(int(s)).standard_normal(tuple(latent_shape), dtype=np.float32)
                      for s in seeds])
    return noise * np.float32(init_noise_sigma)


# --------------------------------------------------------------------------------------------
# Execution providers
# --------------------------------------------------------------------------------------------
def _loadable(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """NVIDIA GPUs visible through the driver API (0 without a driver): no torch, no logs."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def gpu_available() -> bool:
    return cuda_device_count() > 0


def _cuda_libraries() -> bool:
    """The CUDA runtime and cuDNN 9 that this onnxruntime-gpu build links against, loadable."""
    import contextlib
    import io

    import onnxruntime as ort

    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return False
    major = str(cuda_version or "").split(".")[0]
    if not major:
        return False
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls()
    return (_loadable(f"libcudart.so.{major}", f"cudart64_{major}.dll")
            and _loadable("libcudnn.so.9", "cudnn64_9.dll"))


def nvinfer_candidates() -> tuple[str, ...]:
    """libnvinfer 10 by name (the loader path), then where the `tensorrt` pip wheel keeps it
    (site-packages/tensorrt_libs/, which is not on the loader path). Loading it by full path first
    lets ONNX Runtime's TensorRT provider find it later by name."""
    import importlib.util

    names = ["libnvinfer.so.10", "nvinfer_10.dll"]
    spec = importlib.util.find_spec("tensorrt_libs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names += [os.path.join(folder, n) for n in ("libnvinfer.so.10", "nvinfer_10.dll")]
    return tuple(names)


@functools.lru_cache(maxsize=4)
def default_providers(tensorrt: bool | None = None) -> tuple[str, ...]:
    """ORT providers to ask for, best first: TensorRT (opt-in), CUDA, CPU.

    CUDA only with a GPU, ORT's CUDA provider and the CUDA runtime / cuDNN 9 it was built
    against loadable; TensorRT also needs `tensorrt=True` (or BOOT_ORT_TENSORRT=1) and
    libnvinfer 10 (nvinfer_candidates). Which one a session runs: `session.get_providers()`.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen: list[str] = []
    if gpu_available() and "CUDAExecutionProvider" in available and _cuda_libraries():
        if tensorrt is None:
            tensorrt = os.environ.get(TENSORRT_ENV, "") not in ("", "0")
        if tensorrt and "TensorrtExecutionProvider" in available and _loadable(*nvinfer_candidates()):
            chosen.append("TensorrtExecutionProvider")
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return tuple(chosen)


def session(path, providers=None, threads: int | None = None):
    """An ORT InferenceSession with quiet logs (errors only) on the chosen providers."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No busy-waiting worker threads: on a small CPU they steal the cores the next request
    # (or the server's other models) need; measured 3x slower end to end under load with it on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=list(providers or default_providers()))
