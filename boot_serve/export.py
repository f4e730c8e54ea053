"""Export a BOOT student to an ONNX model repository, parity-checked (docs/interfaces.md).

    python -m boot_serve.export --student pretrained/shapes-boot --repository model_repository
    python -m boot_serve.export --student ... --repository ... --precision fp16
    python -m boot_serve.export --student ... --repository ... --precision fp16 --vae-precision fp32
    python -m boot_serve.export --student ... --repository ... --tensorrt --max-batch 16   # GPU only

What it writes into the repository (nothing else there is touched; config.pbtxt files belong
to the serving side):

    text_encoder/1/model.onnx       input_ids INT64 [B, L]                 -> text_states FP32 [B, L, D]
    text_encoder/1/tokenizer/       tokenizer.json (padding + truncation to L built in) and the
                                    transformers files; inside a version folder so that Triton
                                    never mistakes it for a model
    boot_unet/1/model.onnx          noise FP32 [B, C, h, w], text_states FP32 [B, L, D],
                                    guidance_scale FP32 [B]                -> latents FP32 [B, C, h, w]
    vae_decoder/1/model.onnx        latents FP32 [B, C, h, w]              -> image UINT8 [B, H, W, 3]
    SDXL-family students (two text encoders, `text_time` added conditioning, boot.sdxl):
    text_encoder/1/model.onnx       input_ids INT64 [B, L], input_ids_2 INT64 [B, L]
                                                                           -> text_states FP32 [B, L, D1 + D2],
                                                                              text_embeds FP32 [B, P]
    text_encoder/1/tokenizer_2/     the second tokenizer (its own padding token), as tokenizer/
    boot_unet/1/model.onnx          noise, text_states, guidance_scale, text_embeds FP32 [B, P] -> latents;
                                    the time ids (one image size per student) are constants of the graph
    <model>/1/model.onnx.data       all weights of a graph, only when it is over 2 GB
    <model>/1/model-trt<ver>-sm<cc>.plan   TensorRT engine (--tensorrt), batch profile 1/opt/max
    manifest.json                   shapes, dtypes, precision, source, parity numbers, versions

Steps (each is a function below):
  1. load the student with the PyTorch reference pipeline (BootPipeline): the modules traced
     are exactly the ones the reference runs;
  2. export fp32 graphs with the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`),
     into a staging folder next to the repository;
  3. --precision fp16: convert each graph (weights and activations fp16, inputs/outputs fp32,
     sensitive nodes fp32, see `to_fp16`); --vae-precision fp32 leaves the VAE decoder graph in
     fp32 (SD's decoder has activations beyond fp16's 65504 on some latents);
  4. parity: every graph in ONNX Runtime against PyTorch on random inputs at several batch
     sizes, then prompt -> image end to end (OnnxPipeline on the staged repository against
     BootPipeline); any error over tolerance raises ParityError (exit 1) and the repository
     is left as it was;
  5. --tensorrt: build engines from the staged graphs and check them the same way;
  6. move the files into the repository and write manifest.json.

Exporter choice: the TorchScript exporter. Tried on this project's students (torch 2.13):
the dynamo exporter (`dynamo=True`) gives the same parity where it works but (a) fails on
epsilon-prediction students such as SD-1.5 ones: `boot.method.to_x0` checks
`bool((alpha[t] <= 0).any())`, a data-dependent guard torch.export cannot trace; (b) takes
15x longer (tiny UNet 19 s vs 1.3 s; the TorchScript exporter does SD-1.5's UNet in ~60 s on
two cores). The TorchScript exporter records that check as a constant, which is right: t is
always T in the traced graph.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODELS = ("text_encoder", "boot_unet", "vae_decoder")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "boot-repository/1"
TOKENIZER_DIR = "text_encoder/1/tokenizer"
TOKENIZER_2_DIR = "text_encoder/1/tokenizer_2"  # SDXL family
DATA_SUFFIX = ".data"  # external weights: model.onnx.data
TWO_GB = 2**31
OPSETS = (17, 20)  # the TorchScript exporter's range that TensorRT 10 parses
DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 8
TRT_OPT_BATCH = 4
EXIT_NO_GPU = 2

# Real prompts for the end-to-end check; the last is longer than any context (truncation).
PARITY_PROMPTS = (
    "a red circle",
    "a large blue square at the top left",
    "a green triangle left of a yellow circle",
    "a small white square and a purple triangle",
    "a purple triangle right of a yellow triangle, " * 8,
)
PARITY_SEEDS = (0, 1, 2**63 - 1, 12345, 7)


@dataclass(frozen=True)
class GraphSpec:
    """Names of one graph's tensors, identical in ONNX, TensorRT profiles and config.pbtxt."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


SPECS = {
    "text_encoder": GraphSpec("text_encoder", ("input_ids",), ("text_states",)),
    "boot_unet": GraphSpec("boot_unet", ("noise", "text_states", "guidance_scale"), ("latents",)),
    "vae_decoder": GraphSpec("vae_decoder", ("latents",), ("image",)),
}
# SDXL family: the second tokenizer's ids in, the pooled embedding out of the text encoder and into the UNet.
SDXL_SPECS = {
    **SPECS,
    "text_encoder": GraphSpec("text_encoder", ("input_ids", "input_ids_2"), ("text_states", "text_embeds")),
    "boot_unet": GraphSpec("boot_unet", ("noise", "text_states", "guidance_scale", "text_embeds"), ("latents",)),
}


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error of an exported graph against PyTorch fp32.

    Float outputs: `rel` = max |onnx - torch| / max |torch| (scale-free; an element-wise
    relative error is meaningless near zero). uint8 images: max abs difference in levels.
    fp32: ORT and PyTorch differ by kernel summation order only (measured <= 2.3e-6 relative,
    SD-1.5's UNet 1.3e-6), so 1e-4 leaves headroom and still catches a 2% error in one
    convolution (1.4e-2); images may flip a rounding boundary: 2 levels (the 2/255 bound).
    fp16: 11-bit mantissas in weights and activations; measured on the CPU provider 3-5e-4
    (text encoder), 6e-4 (SD-1.5 UNet) to 1.3e-3 (small UNets), images 1-3 levels. 1e-2 and 10
    levels leave room for GPU kernels that also accumulate in fp16; NaN/Inf and black images
    fail regardless (`compare`).
    """

    float_rel: float
    image_levels: int


TOLERANCES = {"fp32": Tolerance(1e-4, 2), "fp16": Tolerance(1e-2, 10)}


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


class StudentLoadError(ValueError):
    """The --student folder is missing files or holds unreadable weights."""


class TensorRTUnavailable(RuntimeError):
    """--tensorrt on a machine without an NVIDIA GPU or without TensorRT."""


# --------------------------------------------------------------------------------------------
# Graph modules: what each model.onnx computes
# --------------------------------------------------------------------------------------------
class TextEncoderGraph(nn.Module):
    """input_ids (B, L) -> text_states (B, L, D) = text_encoder(input_ids)[0], no attention mask."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class VaeDecoderGraph(nn.Module):
    """latents (B, C, h, w) -> image (B, H, W, 3) uint8, diffusers' postprocess in the graph:
    decode(latents / scaling_factor) -> (x/2 + 0.5).clamp(0, 1) -> round(255 x) -> uint8, NHWC.
    Without a VAE (pixel-space student) only the postprocess."""

    def __init__(self, vae: nn.Module | None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor) if vae is not None else 1.0

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents / self.scaling_factor).sample if self.vae is not None else latents
        x = (x / 2 + 0.5).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)


@dataclass
class Student:
    """The loaded student: the PyTorch reference pipeline plus the modules to export."""

    pipe: object  # boot.pipeline.BootPipeline
    folder: Path
    modules: dict[str, nn.Module]
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    max_length: int
    hidden_size: int
    vocab_size: int
    text_embeds_size: int | None = None  # P, the pooled embedding of SDXL-family students

    @property
    def specs(self) -> dict[str, GraphSpec]:
        return SPECS if self.text_embeds_size is None else SDXL_SPECS


def load_student(folder: str | Path) -> Student:
    """Step 1: the student through BootPipeline, so export traces what the reference runs."""
    from boot.folders import STUDENT_META, FolderError, check_model_folder, describe_error, read_meta
    from boot.pipeline import BootPipeline

    folder = Path(folder)
    try:  # a folder that cannot work, named from its config files before any weights are read
        recorded = read_meta(folder).get("prediction_type") if (folder / STUDENT_META).is_file() else None
        check_model_folder(folder, ("unet", "scheduler"), recorded)
    except (FolderError, OSError) as err:
        raise StudentLoadError(f"cannot export the student: {err}") from None
    try:
        pipe = BootPipeline.from_pretrained(folder)
    except Exception as err:  # diffusers/safetensors raise OSError, ValueError, SafetensorError, ...
        raise StudentLoadError(f"cannot load the student from {folder}: {describe_error(err)}") from err
    tok, enc = pipe.text.tokenizer, pipe.text.text_encoder.eval()
    pooled = pipe.text.pooled  # SDXL: enc is a boot.sdxl.DualTextEncoder, the text encoder graph itself
    hidden = enc.hidden_size if pooled else int(enc.config.hidden_size)
    vocab = enc.vocab_size if pooled else int(enc.config.vocab_size)
    if pipe.vae is not None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        out_channels = int(pipe.vae.config.out_channels)
    else:
        factor, out_channels = 1, int(pipe.latent_shape[0])
    c, h, w = pipe.latent_shape
    modules = {
        "text_encoder": enc if pooled else TextEncoderGraph(enc).eval(),
        "boot_unet": pipe.generator.eval(),
        "vae_decoder": VaeDecoderGraph(pipe.vae).eval(),
    }
    return Student(pipe, folder.resolve(), modules, (c, h, w), (h * factor, w * factor, out_channels),
                   int(tok.model_max_length), hidden, vocab, enc.pooled_size if pooled else None)


# --------------------------------------------------------------------------------------------
# Step 2: ONNX export
# --------------------------------------------------------------------------------------------
def example_inputs(student: Student, name: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of graph `name` with batch size `batch` (also the parity inputs)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = student.latent_shape
    ids = student.max_length
    if name == "text_encoder":
        n = len(student.specs[name].inputs)
        return tuple(torch.randint(0, student.vocab_size, (batch, ids), generator=g) for _ in range(n))
    if name == "boot_unet":
        lo, hi = student.pipe.guidance_range
        args = (torch.randn(batch, c, h, w, generator=g) * student.pipe.init_noise_sigma,
                torch.randn(batch, student.max_length, student.hidden_size, generator=g),
                lo + (hi - lo) * torch.rand(batch, generator=g))
        if student.text_embeds_size is not None:
            args += (torch.randn(batch, student.text_embeds_size, generator=g),)
        return args
    if name == "vae_decoder":
        return (torch.randn(batch, c, h, w, generator=g),)
    raise KeyError(name)


def io_shapes(student: Student, name: str) -> dict[str, tuple]:
    """Contract shapes of a graph's tensors (docs/interfaces.md), batch axis named "batch"."""
    c, h, w = student.latent_shape
    lat, states = ("batch", c, h, w), ("batch", student.max_length, student.hidden_size)
    ids, embeds = ("batch", student.max_length), ("batch", student.text_embeds_size)
    return {"text_encoder": {"input_ids": ids, "input_ids_2": ids, "text_states": states, "text_embeds": embeds},
            "boot_unet": {"noise": lat, "text_states": states, "guidance_scale": ("batch",), "text_embeds": embeds,
                          "latents": lat},
            "vae_decoder": {"latents": lat, "image": ("batch", *student.image_shape)}}[name]


def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, path: Path,
                 opset: int, shapes: dict[str, tuple]) -> None:
    """torch.onnx.export (TorchScript) with a dynamic batch axis; weights in one external
    file `model.onnx.data` when the graph is over 2 GB (protobuf's limit). The declared
    input/output shapes are set to `shapes` (the exporter leaves some dims symbolic)."""
    import onnx

    raw = path.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch"} for n in spec.inputs + spec.outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of diffusers' shape asserts, deprecation
        torch.onnx.export(module, args, str(raw / "model.onnx"), input_names=list(spec.inputs),
                          output_names=list(spec.outputs), dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    external = len(list(raw.iterdir())) > 1  # the exporter wrote one file per weight
    model = onnx.load(str(raw / "model.onnx"))
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for size in shapes[value.name]:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    save_onnx(model, path, external=external)
    shutil.rmtree(raw)


def save_onnx(model, path: Path, external: bool | None = None) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) > TWO_GB - 2**26
    for f in (path, path.with_name(path.name + DATA_SUFFIX)):
        f.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + DATA_SUFFIX, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# --------------------------------------------------------------------------------------------
# Step 3: fp16
# --------------------------------------------------------------------------------------------
# Kept in fp32 inside fp16 graphs: normalization statistics (a variance of large activations
# overflows fp16), softmax, and, found by `fp32_nodes`, the sinusoidal time/guidance
# embeddings (sin of arguments up to 1000: fp16 spacing there is 0.5 rad) and the image
# postprocess after the VAE's last convolution (round(255 x) needs more than 11 bits).
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")


def _ancestors(graph, roots: list, stop_ops: tuple[str, ...] = ("Shape",)) -> set[str]:
    """Names of `roots` and every node upstream of them (not crossing `stop_ops`)."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.name in seen or node.op_type in stop_ops:
            continue
        seen.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    return seen


def fp32_nodes(graph) -> set[str]:
    """Nodes an fp16 graph keeps in fp32: sinusoidal embeddings and the uint8 postprocess."""
    keep = _ancestors(graph, [n for n in graph.node if n.op_type in ("Sin", "Cos")])
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if out.name == "image" and out.name in producer:
            convs = _ancestors(graph, [n for n in graph.node if n.op_type == "Conv"])
            keep |= _ancestors(graph, [producer[out.name]]) - convs
    return keep


def _remove_cast_round_trips(graph, fp32_producers: set[str]) -> None:
    """The converter casts every fp32-kept node's output to fp16 and back to fp32 for the next
    fp32-kept node, which throws away exactly the precision we keep (and duplicates cast nodes
    when two kept nodes read one tensor). Rewire fp32 -> fp16 -> fp32 pairs to the fp32 source."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    fp32 = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32 |= {o for n in graph.node if n.name in fp32_producers or cast_to(n) == TensorProto.FLOAT for o in n.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == TensorProto.FLOAT and src is not None and cast_to(src) == TensorProto.FLOAT16
                and src.input[0] in fp32):
            rename[node.output[0]] = src.input[0]
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    # Drop casts nobody reads any more (and identical duplicates), until nothing changes.
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        seen_outputs: set[str] = set()
        keep = []
        for n in graph.node:
            dead = n.op_type == "Cast" and (n.output[0] not in used or n.output[0] in seen_outputs)
            if not dead:
                keep.append(n)
                seen_outputs.update(n.output)
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    live = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(live)


def to_fp16(src: Path, dst: Path) -> dict:
    """fp16 copy of an fp32 graph: fp16 weights and activations, fp32 inputs/outputs, the nodes
    of FP32_OPS and `fp32_nodes` in fp32 (ONNX Runtime's float16 converter + a cast cleanup)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = fp32_nodes(onnx.load(str(src), load_external_data=False).graph)
    ops = set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(str(src), keep_io_types=True, op_block_list=sorted(ops),
                                         node_block_list=sorted(keep))
    blocked = keep | {n.name for n in model.graph.node if n.op_type in ops}
    _remove_cast_round_trips(model.graph, blocked)
    save_onnx(model, dst)
    return {"fp32_nodes": len(blocked), "nodes": len(model.graph.node), "fp32_ops": sorted(FP32_OPS)}


# --------------------------------------------------------------------------------------------
# Step 4: parity
# --------------------------------------------------------------------------------------------
def compare(name: str, output: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance, where: str) -> dict:
    """Error numbers of one output; ParityError above tolerance, for NaN/Inf, or a black image."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise ParityError(f"graph '{name}', output '{output}' ({where}): got {got.dtype}{list(got.shape)}, "
                          f"expected {ref.dtype}{list(ref.shape)}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if ref.dtype == np.uint8:
        err = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
               "frac_differing": float((diff > 0).mean()), "tolerance_levels": tol.image_levels}
        if got.max() == 0 and ref.max() > 0:
            raise ParityError(f"graph '{name}', output '{output}' ({where}): all-black image (reference is not)")
        if not err["max_abs"] <= tol.image_levels:
            raise ParityError(f"graph '{name}', output '{output}' ({where}): max abs error "
                              f"{err['max_abs']:.0f}/255 > tolerance {tol.image_levels}/255")
        return err
    if not np.isfinite(got).all():
        raise ParityError(f"graph '{name}', output '{output}' ({where}): {int((~np.isfinite(got)).sum())} "
                          "NaN/Inf values")
    scale = float(np.abs(ref).max()) or 1.0
    err = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel": float(diff.max()) / scale,
           "tolerance_rel": tol.float_rel}
    if not err["rel"] <= tol.float_rel:
        raise ParityError(f"graph '{name}', output '{output}' ({where}): max abs error {err['max_abs']:.3g}, "
                          f"relative {err['rel']:.3g} > tolerance {tol.float_rel:g}")
    return err


def _merge(a: dict | None, b: dict) -> dict:
    """Worst case over several checks of one output (mean_abs: the mean of the checks')."""
    if a is None:
        return dict(b)
    return {k: max(a[k], b[k]) if k != "mean_abs" else (a[k] + b[k]) / 2 for k in b}


def check_graph(student: Student, name: str, run, tol: Tolerance, batches: tuple[int, ...]) -> dict:
    """Random-input parity of one graph at each batch size; `run(feeds) -> list[np.ndarray]`."""
    spec, module = student.specs[name], student.modules[name]
    worst: dict[str, dict | None] = dict.fromkeys(spec.outputs)
    for i, batch in enumerate(batches):
        args = example_inputs(student, name, batch, seed=1000 + i)
        with torch.no_grad():
            refs = module(*args)
        refs = [r.numpy() for r in (refs if isinstance(refs, (tuple, list)) else (refs,))]
        got = run({n: a.numpy() for n, a in zip(spec.inputs, args)})
        for out, g, r in zip(spec.outputs, got, refs):
            worst[out] = _merge(worst[out], compare(name, out, g, r, tol, f"random inputs, batch {batch}"))
    return {out: {**err, "batches": list(batches)} for out, err in worst.items()}


def check_tokenizer(student: Student, onnx_pipe) -> dict:
    """The repository's tokenizer.json must give the reference tokenizer's ids exactly."""
    prompts = list(PARITY_PROMPTS) + ["", "A Red CIRCLE!!", "ünïcode çircle"]
    pairs = [("input_ids", student.pipe.text.tokenizer, onnx_pipe.tokenize(prompts))]
    if student.pipe.text.tokenizer_2 is not None:
        pairs.append(("input_ids_2", student.pipe.text.tokenizer_2, onnx_pipe.tokenize(prompts, second=True)))
    for name, tok, got in pairs:
        ref = np.asarray(tok(prompts, padding="max_length", max_length=tok.model_max_length,
                             truncation=True).input_ids, dtype=np.int64)
        if got.shape != ref.shape or not np.array_equal(got, ref):
            raise ParityError(f"graph 'text_encoder', input '{name}': the exported tokenizer gives other ids "
                              f"than the student's tokenizer ({got.shape} vs {ref.shape})")
    return {"prompts": len(prompts), "identical": True}


def check_end_to_end(student: Student, onnx_pipe, tol: Tolerance, n_prompts: int = len(PARITY_PROMPTS)) -> dict:
    """Prompt -> image through OnnxPipeline (the staged repository) against BootPipeline, at
    the lowest, recommended and highest guidance of the student."""
    prompts, seeds = list(PARITY_PROMPTS[:n_prompts]), list(PARITY_SEEDS[:n_prompts])
    lo, hi = student.pipe.guidance_range
    worst, cases = None, 0
    for w in sorted({lo, student.pipe.guidance_scale, hi}):
        ref = np.stack([np.asarray(im) for im in student.pipe(prompts, seeds, w)])
        got = np.stack([np.asarray(im) for im in onnx_pipe(prompts, seeds, w)])
        worst = _merge(worst, compare("end_to_end", "image", got, ref, tol, f"prompts, guidance {w}"))
        cases += len(prompts)
    return {"image": {**worst, "images": cases}}


# --------------------------------------------------------------------------------------------
# Step 5: TensorRT (GPU only)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Manifest and the whole procedure
# --------------------------------------------------------------------------------------------
def graph_info(path: Path, repo_root: Path) -> dict:
    """Names, dtypes and shapes (batch as "B") of a graph's inputs and outputs, its files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param and "B" or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    data = path.with_name(path.name + DATA_SUFFIX)
    files = [path] + ([data] if data.is_file() else [])
    return {"path": path.relative_to(repo_root).as_posix(),
            "external_data": data.relative_to(repo_root).as_posix() if data.is_file() else None,
            "bytes": sum(f.stat().st_size for f in files), "opset": model.opset_import[0].version,
            "inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("boot", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "diffusers", "transformers",
                "tokenizers", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def write_tokenizer(student: Student, folder: Path, tok=None) -> None:
    """The student's tokenizer files (or those of `tok`, SDXL's second), with padding and truncation
    to max_length written into tokenizer.json, so `tokenizers.Tokenizer.from_file` alone reproduces
    `tokenizer(prompts, padding="max_length", max_length=L, truncation=True)`."""
    from tokenizers import Tokenizer

    tok = tok or student.pipe.text.tokenizer
    if not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"the student's tokenizer {type(tok).__name__} is not a fast tokenizer")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=student.max_length, direction=tok.truncation_side)
    backend.enable_padding(length=student.max_length, pad_id=tok.pad_token_id, pad_token=tok.pad_token,
                           pad_type_id=tok.pad_token_type_id, direction=tok.padding_side)
    backend.save(str(folder / "tokenizer.json"))


def manifest(student: Student, stage: Path, precision: str, max_batch: int, opset: int) -> dict:
    meta = student.pipe.meta
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_student": str(student.folder),
        "student": {**{k: meta.get(k) for k in ("format", "teacher", "prediction_type", "input_timestep", "steps")},
                    "parameterization": student.pipe.generator.student.parameterization},
        "precision": precision,
        "latent_shape": list(student.latent_shape),
        "image_shape": list(student.image_shape),
        "max_length": student.max_length,
        "hidden_size": student.hidden_size,
        "init_noise_sigma": float(student.pipe.init_noise_sigma),
        "guidance_range": [float(v) for v in student.pipe.guidance_range],
        "guidance_scale": float(student.pipe.guidance_scale),
        "max_batch": max_batch,
        "tokenizer": TOKENIZER_DIR,
        **sdxl_manifest(student),
        "exporter": f"torch.onnx.export (TorchScript), opset {opset}",
        "graphs": {m: graph_info(stage / m / "1" / "model.onnx", stage) for m in MODELS},
        "versions": versions(),
    }


def sdxl_manifest(student: Student) -> dict:
    """SDXL family: the second tokenizer, the pooled width and the time ids folded into boot_unet."""
    if student.text_embeds_size is None:
        return {}
    return {"tokenizer_2": TOKENIZER_2_DIR, "text_embeds_size": student.text_embeds_size,
            "time_ids": student.pipe.generator.student.time_ids.int().tolist()}


def stage_dir(repository: Path) -> Path:
    """Staging folder beside the repository (same filesystem, so the final move is a rename;
    outside it, so a polling tritonserver never sees half-written models)."""
    repository.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{repository.name}-export-", dir=repository.parent))


def install(stage: Path, repository: Path) -> None:
    """Step 6: move the staged graphs, plans, tokenizer and manifest into the repository."""
    for model in MODELS:
        dst = repository / model / "1"
        dst.mkdir(parents=True, exist_ok=True)
        # Files this export owns: an older export's weights or engines must not outlive it.
        for stale in [dst / ("model.onnx" + DATA_SUFFIX), *dst.glob("model-trt*.plan")]:
            stale.unlink(missing_ok=True)
        for f in (stage / model / "1").iterdir():
            if f.is_file():
                os.replace(f, dst / f.name)
    for tok_dir in (TOKENIZER_DIR, TOKENIZER_2_DIR):
        tok = repository / tok_dir
        if tok.exists():
            shutil.rmtree(tok)
        if (stage / tok_dir).exists():
            os.replace(stage / tok_dir, tok)
    os.replace(stage / MANIFEST, repository / MANIFEST)


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


VAE_PRECISIONS = ("same", "fp32")


def graph_precisions(precision: str, vae_precision: str = "same") -> dict[str, str]:
    """Each graph's precision: --precision, but the VAE decoder's fp32 with --vae-precision fp32."""
    if vae_precision not in VAE_PRECISIONS:
        raise ValueError(f"vae precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
    return {m: "fp32" if m == "vae_decoder" and vae_precision == "fp32" else precision for m in MODELS}


def export_graphs(student: Student, stage: Path, precision: str | dict[str, str], opset: int) -> dict[str, dict]:
    """Steps 2-3: every graph into `stage/<model>/1/model.onnx`; seconds (and fp16 facts) per graph.
    `precision`: one for all graphs, or per graph (`graph_precisions`)."""
    done = {}
    for model in MODELS:
        t0 = time.perf_counter()
        path = stage / model / "1" / "model.onnx"
        args, shapes = example_inputs(student, model, 2), io_shapes(student, model)
        if (precision if isinstance(precision, str) else precision[model]) == "fp32":
            export_graph(student.modules[model], args, student.specs[model], path, opset, shapes)
            done[model] = {}
        else:
            fp32 = stage / model / "fp32" / "model.onnx"
            export_graph(student.modules[model], args, student.specs[model], fp32, opset, shapes)
            done[model] = {"fp16": to_fp16(fp32, path)}
            shutil.rmtree(fp32.parent)
        done[model]["export_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{model}: exported in {done[model]['export_seconds']} s")
    return done


VAE_FP16_HINT = ("an fp16 VAE decoder's activations can exceed fp16's range (65504); export with "
                 "--vae-precision fp32 to keep the VAE decoder in fp32 inside the fp16 export")


def check_parity(student: Student, stage: Path, tol: Tolerance, batches: tuple[int, ...], e2e_prompts: int,
                 precisions: dict[str, str] | None = None) -> dict:
    """Step 4: each staged graph on random inputs, the tokenizer, then prompts end to end. A graph
    kept in fp32 (`precisions`) is held to the fp32 tolerance."""
    from boot_serve.onnx_pipeline import OnnxPipeline
    from boot_serve.runtime import session

    parity: dict = {"tolerance": asdict(tol), "graphs": {}}
    for model in MODELS:
        sess = session(stage / model / "1" / "model.onnx", providers=["CPUExecutionProvider"])
        graph_tol = TOLERANCES[precisions[model]] if precisions else tol
        try:
            parity["graphs"][model] = check_graph(student, model, lambda f, s=sess: s.run(None, f), graph_tol,
                                                  batches)
        except ParityError as err:
            if model == "vae_decoder" and precisions and precisions[model] == "fp16":
                raise ParityError(f"{err}; {VAE_FP16_HINT}") from None
            raise
        log(f"{model}: parity {_summary(parity['graphs'][model])}")
        del sess
    onnx_pipe = OnnxPipeline.from_pretrained(stage, providers=["CPUExecutionProvider"])
    parity["tokenizer"] = check_tokenizer(student, onnx_pipe)
    parity["end_to_end"] = check_end_to_end(student, onnx_pipe, tol, e2e_prompts)
    log(f"end to end: {_summary(parity['end_to_end'])}")
    return parity


def export(student_dir: str | Path, repository: str | Path, precision: str = "fp32", tensorrt: bool = False,
           max_batch: int = DEFAULT_MAX_BATCH, opset: int = DEFAULT_OPSET, parity_batches: tuple[int, ...] = (1, 3),
           e2e_prompts: int = len(PARITY_PROMPTS), timing_cache: str | Path | None = None,
           vae_precision: str = "same") -> dict:
    """Export, check and install a student; returns the manifest. Raises ParityError (nothing
    installed, the staged files kept for inspection) or TensorRTUnavailable."""
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset must be in [{OPSETS[0]}, {OPSETS[1]}], got {opset}")
    if tensorrt and (problem := tensorrt_problem()):
        raise TensorRTUnavailable(f"--tensorrt needs an NVIDIA GPU with TensorRT: {problem}")
    start, tol, repository = time.perf_counter(), TOLERANCES[precision], Path(repository)
    precisions = graph_precisions(precision, vae_precision)
    log(f"loading {student_dir}")
    student = load_student(student_dir)  # 1.
    stage = stage_dir(repository)
    try:
        exported = export_graphs(student, stage, precisions, opset)  # 2-3.
        write_tokenizer(student, stage / TOKENIZER_DIR)
        if student.pipe.text.tokenizer_2 is not None:
            write_tokenizer(student, stage / TOKENIZER_2_DIR, student.pipe.text.tokenizer_2)
        info = manifest(student, stage, precision, max_batch, opset)
        for model in MODELS:
            info["graphs"][model]["precision"] = precisions[model]
        (stage / MANIFEST).write_text(json.dumps(info, indent=1))  # OnnxPipeline reads it in step 4
        info["parity"] = check_parity(student, stage, tol, parity_batches, e2e_prompts, precisions)  # 4.
        if tensorrt:  # 5.
            info["tensorrt"] = build_engines(stage, precision, max_batch, student, tol,
                                             Path(timing_cache) if timing_cache else None)
        for model in MODELS:
            info["graphs"][model].update(exported[model], parity=info["parity"]["graphs"][model])
        info["export_seconds"] = round(time.perf_counter() - start, 1)
        (stage / MANIFEST).write_text(json.dumps(info, indent=1))
        install(stage, repository)  # 6.
    except ParityError as err:
        raise ParityError(f"{err} [export NOT installed; staged files kept in {stage}]") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    log(f"wrote {repository} ({precision}) in {info['export_seconds']} s")
    return info


def _summary(errs: dict) -> str:
    parts = []
    for out, e in errs.items():
        parts.append(f"{out} max abs {e['max_abs']:.3g}" + (f", rel {e['rel']:.2g}" if "rel" in e else "/255"))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _batch_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers, e.g. 1,3")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boot_serve.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="BOOT student folder (boot.json, unet/, vae/, scheduler/)")
    p.add_argument("--repository", default="model_repository", help="Triton model repository to fill")
    p.add_argument("--precision", choices=sorted(TOLERANCES), default="fp32",
                   help="graph precision; inputs/outputs stay fp32/int64/uint8 either way")
    p.add_argument("--vae-precision", choices=VAE_PRECISIONS, default="same",
                   help="same: the VAE decoder graph in --precision; fp32: kept in fp32 inside an fp16 export "
                        "(an SD VAE decoder can overflow fp16)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (NVIDIA GPU only)")
    p.add_argument("--max-batch", type=_positive, default=DEFAULT_MAX_BATCH,
                   help="largest batch of the TensorRT profiles (min 1, opt 4)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=range(OPSETS[0], OPSETS[1] + 1),
                   metavar=f"{{{OPSETS[0]}..{OPSETS[1]}}}", help="ONNX opset")
    p.add_argument("--parity-batches", type=_batch_list, default=(1, 3),
                   help="batch sizes of the random-input parity check, comma-separated")
    p.add_argument("--e2e-prompts", type=int, default=len(PARITY_PROMPTS), choices=range(1, len(PARITY_PROMPTS) + 1),
                   metavar=f"{{1..{len(PARITY_PROMPTS)}}}",
                   help="real prompts of the end-to-end check (each at the lowest, default and highest guidance)")
    p.add_argument("--configs", choices=["auto", "cpu", "cpu-onehop", "cpu-ensemble", "gpu", "tensorrt", "none"],
                   default="auto",
                   help="Triton configs to (re)write from the new manifest (boot_serve.triton_repo): cpu = the "
                        "default CPU variant, one of cpu-ensemble (four chained Python models) and cpu-onehop "
                        "(one Python model serves the whole request), gpu = onnxruntime backend with TensorRT "
                        "accelerator, tensorrt = the plans; auto = tensorrt with --tensorrt, else cpu")
    p.add_argument("--timing-cache", default=None,
                   help="TensorRT timing cache file (default: ~/.cache/boot/tensorrt/timing-<trt>-<gpu>.cache)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tensorrt and (problem := tensorrt_problem()):
        print(f"error: --tensorrt builds TensorRT engines and needs an NVIDIA GPU with TensorRT: {problem}. "
              "Export without --tensorrt here (the ONNX graphs serve on CPU and GPU), or run this "
              "command on a GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        export(args.student, args.repository, args.precision, args.tensorrt, args.max_batch, args.opset,
               args.parity_batches, args.e2e_prompts, args.timing_cache, args.vae_precision)
    except StudentLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ParityError as err:
        print(f"error: parity check failed: {err}", file=sys.stderr)
        return 1
    if args.configs != "none":
        from boot_serve.triton_repo import write_configs

        variant = ("tensorrt" if args.tensorrt else "cpu") if args.configs == "auto" else args.configs
        write_configs(args.repository, variant)
        log(f"wrote the {variant} Triton configs of {args.repository}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
