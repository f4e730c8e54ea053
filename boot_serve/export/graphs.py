"""The student's three graphs: the modules that are traced, their example inputs and shapes, the
ONNX export itself (external data over 2 GB) and the per-graph precision."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from boot_serve.export.fp16 import to_fp16
from boot_serve.export.spec import (
    MODELS,
    SDXL_SPECS,
    SPECS,
    VAE_PRECISIONS,
    GraphSpec,
    StudentLoadError,
    log,
    save_onnx,
)


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


def load_student(folder: str | Path, tiny_decoder: str | Path | None = None) -> Student:
    """Step 1: the student through BootPipeline, so export traces what the reference runs. `tiny_decoder`: an
    AutoencoderTiny folder (python -m distill.tiny_decoder) that replaces the student's VAE decoder, in the
    graphs and in the reference alike; refused unless it reads the student's latents (boot.decoders)."""
    from boot.decoders import DecoderMismatch, load_tiny_decoder
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
    if tiny_decoder is not None:
        if pipe.vae is None:
            raise StudentLoadError(f"{folder} has no VAE (a pixel-space student): no decoder for {tiny_decoder} to "
                                   "replace")
        try:
            pipe.vae = load_tiny_decoder(tiny_decoder, pipe.vae.config)
        except (DecoderMismatch, OSError) as err:
            raise StudentLoadError(f"cannot export with the tiny decoder: {err}") from None
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

