"""Parity: each graph in ONNX Runtime against PyTorch on random inputs, the tokenizer, and prompts
end to end; any error above tolerance fails the export."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from boot_serve.export.graphs import Student, example_inputs
from boot_serve.export.spec import (
    MODELS,
    PARITY_PROMPTS,
    PARITY_SEEDS,
    TOLERANCES,
    VAE_FP16_HINT,
    ParityError,
    Tolerance,
    log,
)


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


def _summary(errs: dict) -> str:
    parts = []
    for out, e in errs.items():
        parts.append(f"{out} max abs {e['max_abs']:.3g}" + (f", rel {e['rel']:.2g}" if "rel" in e else "/255"))
    return "; ".join(parts)

