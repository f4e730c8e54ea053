"""What the export writes and checks against: graph names and tensor specs, tolerances, the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


VAE_PRECISIONS = ("same", "fp32")


VAE_FP16_HINT = ("an fp16 VAE decoder's activations can exceed fp16's range (65504); export with "
                 "--vae-precision fp32 to keep the VAE decoder in fp32 inside the fp16 export")


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
