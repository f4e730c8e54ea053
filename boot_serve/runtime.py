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
import os

import numpy as np  # noqa: F401

from boot.contract import MAX_SEED, ChunkedCall, check_inputs, seed_noise  # noqa: F401  (the contract, re-exported)

# Opt in to ORT's TensorRT execution provider (it builds engines at session start: minutes).
TENSORRT_ENV = "BOOT_ORT_TENSORRT"


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
