"""TensorRT plans (export --tensorrt, GPU machines): profiles 1 / 4 / max, timing cache, file names tied to
the TensorRT version and GPU, and their own parity check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from boot_serve.export.graphs import Student
from boot_serve.export.parity import check_graph
from boot_serve.export.spec import MODELS, TRT_OPT_BATCH, GraphSpec, Tolerance


def tensorrt_problem() -> str | None:
    """Why --tensorrt cannot run here, or None."""
    from boot_serve.runtime import gpu_available

    if not gpu_available():
        return "no NVIDIA GPU (no CUDA driver or no device) on this machine"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the TensorRT Python package is not installed (pip install 'boot[tensorrt]')"
    if not torch.cuda.is_available():
        return "PyTorch has no CUDA here; the engine parity check runs on CUDA tensors"
    return None


def plan_name() -> str:
    """Engines are only valid for the TensorRT version and GPU architecture that built them."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return f"model-trt{trt.__version__}-sm{major}{minor}.plan"


def build_engine(onnx_path: Path, plan_path: Path, precision: str, max_batch: int, cache_path: Path) -> dict:
    """TensorRT engine with one optimization profile over the batch axis: 1 / opt / max.

    fp16: a strongly typed network built from the fp16 graph, so TensorRT keeps in fp32
    exactly what `to_fp16` kept there; fp32: TF32 off, to stay inside the fp32 tolerance.
    The timing cache (per TensorRT version and GPU) makes rebuilds fast."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "fp16" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):  # TensorRT 11 dropped the flag
        config.clear_flag(trt.BuilderFlag.TF32)
    opt = min(TRT_OPT_BATCH, max_batch)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"build_seconds": round(time.perf_counter() - start, 1), "bytes": plan_path.stat().st_size,
            "profile": {"min": 1, "opt": opt, "max": max_batch}}


class EngineRunner:
    """Runs a TensorRT plan on CUDA tensors (PyTorch owns the memory): feeds -> outputs."""

    def __init__(self, plan_path: Path, spec: GraphSpec):
        import tensorrt as trt

        self.trt, self.spec = trt, spec
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        keep = []
        for name in self.spec.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self.spec.outputs:
            dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        stream = torch.cuda.current_stream()  # the one the input copies were queued on
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
        stream.synchronize()
        return [t.cpu().numpy() for t in outs]


def default_timing_cache() -> Path:
    import tensorrt as trt

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "boot" / "tensorrt"
    major, minor = torch.cuda.get_device_capability()
    return base / f"timing-trt{trt.__version__}-sm{major}{minor}.cache"


def build_engines(stage: Path, precision: str, max_batch: int, student: Student, tol: Tolerance,
                  cache_path: Path | None) -> dict:
    """Step 5: one engine per staged graph, parity-checked at batch 1, opt and max."""
    import tensorrt as trt

    cache_path = cache_path or default_timing_cache()
    name = plan_name()
    batches = tuple(sorted({1, min(TRT_OPT_BATCH, max_batch), max_batch}))
    major, minor = torch.cuda.get_device_capability()
    info = {"version": trt.__version__, "device": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}",
            "timing_cache": str(cache_path), "plans": {}}
    for model in MODELS:
        plan = stage / model / "1" / name
        built = build_engine(stage / model / "1" / "model.onnx", plan, precision, max_batch, cache_path)
        parity = check_graph(student, model, EngineRunner(plan, student.specs[model]), tol, batches)
        info["plans"][model] = {"path": f"{model}/1/{name}", **built, "parity": parity}
    return info

