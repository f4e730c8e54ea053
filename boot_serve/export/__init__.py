"""Export a BOOT student to an ONNX model repository, parity-checked (docs/interfaces.md).

    python -m boot_serve.export --student pretrained/shapes-boot --repository model_repository
    python -m boot_serve.export --student ... --repository ... --precision fp16
    python -m boot_serve.export --student ... --repository ... --precision fp16 --vae-precision fp32
    python -m boot_serve.export --student ... --repository ... --tensorrt --max-batch 16   # GPU only
    python -m boot_serve.export --student ... --repository ... --decoder tiny --tiny-decoder DIR

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
     are exactly the ones the reference runs; --decoder tiny puts the AutoencoderTiny of
     --tiny-decoder (python -m distill.tiny_decoder) in place of the VAE decoder there, so the
     vae_decoder graph, its parity and the end-to-end reference all use it (refused, exit 2, unless
     its latent channels and scaling factor are the student's);
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
import json
import shutil
import sys
import time
from pathlib import Path

from boot.cli import Parser
from boot_serve.export.graphs import export_graphs, graph_precisions, load_student
from boot_serve.export.parity import check_parity
from boot_serve.export.repository import install, manifest, stage_dir, write_tokenizer
from boot_serve.export.spec import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPSET,
    EXIT_NO_GPU,
    MANIFEST,
    MODELS,
    OPSETS,
    PARITY_PROMPTS,
    TOKENIZER_2_DIR,
    TOKENIZER_DIR,
    TOLERANCES,
    VAE_PRECISIONS,
    ParityError,
    StudentLoadError,
    TensorRTUnavailable,
    log,
)
from boot_serve.export.tensorrt import build_engines, tensorrt_problem


def export(student_dir: str | Path, repository: str | Path, precision: str = "fp32", tensorrt: bool = False,
           max_batch: int = DEFAULT_MAX_BATCH, opset: int = DEFAULT_OPSET, parity_batches: tuple[int, ...] = (1, 3),
           e2e_prompts: int = len(PARITY_PROMPTS), timing_cache: str | Path | None = None,
           vae_precision: str = "same", tiny_decoder: str | Path | None = None) -> dict:
    """Export, check and install a student; returns the manifest. Raises ParityError (nothing
    installed, the staged files kept for inspection) or TensorRTUnavailable. `tiny_decoder`: the
    folder of a tiny decoder that replaces the student's VAE decoder (manifest "decoder")."""
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset must be in [{OPSETS[0]}, {OPSETS[1]}], got {opset}")
    if tensorrt and (problem := tensorrt_problem()):
        raise TensorRTUnavailable(f"--tensorrt needs an NVIDIA GPU with TensorRT: {problem}")
    start, tol, repository = time.perf_counter(), TOLERANCES[precision], Path(repository)
    precisions = graph_precisions(precision, vae_precision)
    log(f"loading {student_dir}")
    student = load_student(student_dir, tiny_decoder)  # 1.
    stage = stage_dir(repository)
    try:
        exported = export_graphs(student, stage, precisions, opset)  # 2-3.
        write_tokenizer(student, stage / TOKENIZER_DIR)
        if student.pipe.text.tokenizer_2 is not None:
            write_tokenizer(student, stage / TOKENIZER_2_DIR, student.pipe.text.tokenizer_2)
        info = manifest(student, stage, precision, max_batch, opset)
        info["decoder"] = decoder_info(tiny_decoder)
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


def decoder_info(tiny_decoder: str | Path | None) -> dict:
    """manifest "decoder": which decoder the vae_decoder graph holds."""
    if tiny_decoder is None:
        return {"kind": "full"}
    from boot.decoders import TINY_META

    meta_path = Path(tiny_decoder) / TINY_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"kind": "tiny", "folder": str(tiny_decoder), "format": meta.get("format"),
            "psnr_tiny_vs_full_db": meta.get("measured", {}).get("psnr_tiny_vs_full_db", {}).get("mean")}


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


def parser() -> Parser:
    p = Parser(prog="python -m boot_serve.export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="BOOT student folder (boot.json, unet/, vae/, scheduler/)")
    p.add_argument("--repository", default="model_repository", help="Triton model repository to fill")
    p.add_argument("--precision", choices=sorted(TOLERANCES), default="fp32",
                   help="graph precision; inputs/outputs stay fp32/int64/uint8 either way")
    p.add_argument("--decoder", choices=("full", "tiny"), default="full",
                   help="full: the student's VAE decoder; tiny: the AutoencoderTiny of --tiny-decoder in its place")
    p.add_argument("--tiny-decoder", type=Path, default=None,
                   help="tiny decoder folder for --decoder tiny (python -m distill.tiny_decoder writes one)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (NVIDIA GPU only)")
    p.add_argument("--configs", choices=["auto", "cpu", "cpu-onehop", "cpu-ensemble", "gpu", "tensorrt", "none"],
                   default="auto",
                   help="Triton configs to (re)write from the new manifest (boot_serve.triton_repo): cpu = the "
                        "default CPU variant, one of cpu-ensemble (four chained Python models) and cpu-onehop "
                        "(one Python model serves the whole request), gpu = onnxruntime backend with TensorRT "
                        "accelerator, tensorrt = the plans; auto = tensorrt with --tensorrt, else cpu")
    x = p.operator_group("graphs and checks (experts)")
    x.add_argument("--vae-precision", choices=VAE_PRECISIONS, default="same",
                   help="same: the VAE decoder graph in --precision; fp32: kept in fp32 inside an fp16 export "
                        "(an SD VAE decoder can overflow fp16)")
    x.add_argument("--max-batch", type=_positive, default=DEFAULT_MAX_BATCH,
                   help="largest batch of the TensorRT profiles (min 1, opt 4)")
    x.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=range(OPSETS[0], OPSETS[1] + 1),
                   metavar=f"{{{OPSETS[0]}..{OPSETS[1]}}}", help="ONNX opset")
    x.add_argument("--parity-batches", type=_batch_list, default=(1, 3),
                   help="batch sizes of the random-input parity check, comma-separated")
    x.add_argument("--e2e-prompts", type=int, default=len(PARITY_PROMPTS), choices=range(1, len(PARITY_PROMPTS) + 1),
                   metavar=f"{{1..{len(PARITY_PROMPTS)}}}",
                   help="real prompts of the end-to-end check (each at the lowest, default and highest guidance)")
    x.add_argument("--timing-cache", default=None,
                   help="TensorRT timing cache file (default: ~/.cache/boot/tensorrt/timing-<trt>-<gpu>.cache)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if (args.decoder == "tiny") != (args.tiny_decoder is not None):
        p.error("--decoder tiny and --tiny-decoder DIR go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tensorrt and (problem := tensorrt_problem()):
        print(f"error: --tensorrt builds TensorRT engines and needs an NVIDIA GPU with TensorRT: {problem}. "
              "Export without --tensorrt here (the ONNX graphs serve on CPU and GPU), or run this "
              "command on a GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        export(args.student, args.repository, args.precision, args.tensorrt, args.max_batch, args.opset,
               args.parity_batches, args.e2e_prompts, args.timing_cache, args.vae_precision, args.tiny_decoder)
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


from boot_serve.export.fp16 import *  # noqa: E402,F401,F403
from boot_serve.export.graphs import *  # noqa: E402,F401,F403
from boot_serve.export.parity import *  # noqa: E402,F401,F403
from boot_serve.export.repository import *  # noqa: E402,F401,F403
from boot_serve.export.spec import *  # noqa: E402,F401,F403
from boot_serve.export.tensorrt import *  # noqa: E402,F401,F403
