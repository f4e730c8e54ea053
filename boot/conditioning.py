"""A student's conditioning as a folder stores it: the boot.json record, the unet/ weights, the conversion.

boot.method computes the conditioning (CONDITIONINGS, student_condition, the condition projections); this
module is its stored form (docs/interfaces.md "Student folder", docs/diffusers.md):

    conditioning_record, recorded_conditioning,    boot.json "conditioning"
    recorded_guidance_band
    save_student_unet, check_student_unet,         unet/ in diffusers' own form (a plain cond_proj), the t
    load_student_unet                              weights of a "diffusers-guidance" student beside it
    convert_conditioning                           a "sinusoid" student made a "diffusers-guidance" one
                                                   (least squares on the guidance features, held at the
                                                   nearer end of the trained range outside it)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from boot.method import (
    CONDITIONINGS,
    DEFAULT_CONDITIONING,
    EMBED_DIM,
    GUIDANCE_EMBED_SCALE,
    LEGACY_CONDITIONING,
    TIME_COND_PROJ_DIM,
    GuidanceTimeProjection,
    add_condition_projection,
    guidance_embedding,
    guidance_frequencies,
    restore_projection,
    sinusoid,
    to_plain_projection,
    unet_conditioning,
)

# A "diffusers-guidance" UNet's t weights A_t, beside its diffusers weights in unet/ (diffusers never reads them).
TIME_WEIGHTS = "boot_time_condition.safetensors"
# unet/config.json key naming the conditioning kind the weights were saved in (diffusers ignores "_" keys), so a
# folder whose boot.json records another kind is refused at load (load_student_unet).
SAVED_CONDITIONING_KEY = "_boot_conditioning"
# Plain diffusers feeds a converted student any guidance scale (StableDiffusionPipeline's default is 7.5); the
# project's own pipelines refuse one outside the trained range. The conversion's fit also spans SATURATION_RANGE,
# where a scale outside the trained range takes the features of the nearer end of it, each such scale weighing
# OUTSIDE_WEIGHT of one inside: the weight that leaves the trained range's images nearly as they were and still
# holds the images outside it at the nearer end's (docs/diffusers.md, "Guidance outside the trained range").
SATURATION_RANGE = (0.0, 20.0)
OUTSIDE_WEIGHT = 1e-4
POINTS_PER_UNIT = 2_000  # guidance scales per unit of w in the fit (E's fastest column turns 1000 rad per unit)


def recorded_conditioning(meta: dict) -> str:
    """A student's conditioning kind from its boot.json (folders without a "kind" use "sinusoid")."""
    return (meta.get("conditioning") or {}).get("kind", LEGACY_CONDITIONING)


def conditioning_record(kind: str, guidance_band: float | None = None) -> dict:
    """boot.json "conditioning" of a student of this kind (`guidance_band`: see boot.method.GUIDANCE_BAND)."""
    if kind == LEGACY_CONDITIONING:
        return {"kind": kind, "time_cond_proj_dim": TIME_COND_PROJ_DIM, "embed_dim": EMBED_DIM,
                "guidance_embed_scale": GUIDANCE_EMBED_SCALE}
    return {"kind": kind, "time_cond_proj_dim": TIME_COND_PROJ_DIM, "guidance": "get_guidance_scale_embedding(w - 1)",
            "time": "sinusoid(t) - sinusoid(0)", "embed_dim": EMBED_DIM, "time_weights": f"unet/{TIME_WEIGHTS}",
            **({"guidance_band": guidance_band} if guidance_band else {})}


def recorded_guidance_band(meta: dict) -> float | None:
    """The guidance band a student was trained with (None: all of E's columns)."""
    return (meta.get("conditioning") or {}).get("guidance_band")


def save_student_unet(unet: nn.Module, folder: str | Path) -> None:
    """unet.save_pretrained(folder) in diffusers' own form (a plain cond_proj), plus TIME_WEIGHTS beside it
    for a "diffusers-guidance" UNet, so that diffusers loads unet/ with no unknown weights."""
    saved = to_plain_projection(unet)  # a training form is saved as the plain one it equals
    try:
        _save_plain_student_unet(unet, folder)
    finally:
        restore_projection(unet, saved)


def _save_plain_student_unet(unet: nn.Module, folder: str | Path) -> None:
    from safetensors.torch import save_file

    emb = unet.time_embedding
    proj = emb.cond_proj
    unet.register_to_config(**{SAVED_CONDITIONING_KEY: unet_conditioning(unet)})
    if not isinstance(proj, GuidanceTimeProjection):
        unet.save_pretrained(folder, safe_serialization=True)
        return
    plain = nn.Linear(proj.in_features, proj.out_features, bias=False, device="meta")
    plain.weight = proj.weight  # the same Parameter: nothing is copied
    emb.cond_proj = plain
    try:
        unet.save_pretrained(folder, safe_serialization=True)
    finally:
        emb.cond_proj = proj
    save_file({"time_embedding.cond_proj.time_weight": proj.time_weight.detach().float().cpu().contiguous()},
              str(Path(folder) / TIME_WEIGHTS))


def check_student_unet(folder: str | Path, kind: str, guidance_band: float | None = None) -> None:
    """ValueError, one line naming the mismatch, unless the UNet folder `folder` holds weights of the conditioning
    `kind` (and `guidance_band`) its boot.json records: the time_cond_proj_dim of a student, the kind its
    config.json says they were saved in (SAVED_CONDITIONING_KEY, where present), and TIME_WEIGHTS beside them
    exactly when the kind is "diffusers-guidance". From the config files alone, before any weight is read."""
    folder = Path(folder)
    said = f"boot.json records a {kind!r} conditioning, but {folder}"
    if kind not in CONDITIONINGS:
        raise ValueError(f"boot.json conditioning kind {kind!r} is not one of {CONDITIONINGS}")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config and config.get("time_cond_proj_dim") != TIME_COND_PROJ_DIM:
        raise ValueError(f"{said}/config.json has time_cond_proj_dim {config.get('time_cond_proj_dim')} (a student's "
                         f"is {TIME_COND_PROJ_DIM}): not a BOOT student's UNet")
    saved_as = config.get(SAVED_CONDITIONING_KEY)
    if saved_as is not None and saved_as != kind:
        raise ValueError(f"{said} holds weights saved as a {saved_as!r} student ({SAVED_CONDITIONING_KEY} in its "
                         "config.json): the record does not match the weights")
    has_time_weights = (folder / TIME_WEIGHTS).is_file()
    if kind == DEFAULT_CONDITIONING and not has_time_weights:
        raise ValueError(f"{said} lacks {TIME_WEIGHTS}, the t weights of that kind (weights of a "
                         f"{LEGACY_CONDITIONING!r} student, or a conversion left unfinished): the record does not "
                         "match the weights")
    if kind == LEGACY_CONDITIONING and has_time_weights:
        raise ValueError(f"{said} holds {TIME_WEIGHTS}, the t weights of a {DEFAULT_CONDITIONING!r} student: "
                         "the record does not match the weights")
    if guidance_band and kind != DEFAULT_CONDITIONING:
        raise ValueError(f"boot.json records a guidance band {guidance_band:g} for a {kind!r} conditioning, "
                         f"which has none (only {DEFAULT_CONDITIONING!r} students are band-limited)")


def load_student_unet(folder: str | Path, kind: str, guidance_band: float | None = None) -> nn.Module:
    """A student's UNet from `folder` (its unet/ directory) as save_student_unet wrote it, ready for Student.
    Weights that are not of the conditioning `kind` (and `guidance_band`) boot.json records are refused with a
    ValueError naming the mismatch (check_student_unet; a band-limited student's guidance weights above its band
    must be 0), rather than loaded and run with the wrong features."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    check_student_unet(folder, kind, guidance_band)
    unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    if kind == LEGACY_CONDITIONING:
        return unet
    weight = unet.time_embedding.cond_proj.weight.detach().clone()
    if guidance_band:
        fast = guidance_frequencies(weight.shape[1]) > guidance_band
        if bool(weight[:, fast].ne(0).any()):
            raise ValueError(f"boot.json records a guidance band of {guidance_band:g} rad per unit of w, but the "
                             f"guidance weights in {folder} use E(w - 1)'s columns above it: the record does not match "
                             "the weights")
    add_condition_projection(unet, kind)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(weight)
        unet.time_embedding.cond_proj.time_weight.copy_(
            load_file(str(folder / TIME_WEIGHTS))["time_embedding.cond_proj.time_weight"])
    return unet


def saturating_projection(guidance_range: tuple[float, float], saturate: tuple[float, float] = SATURATION_RANGE,
                          points_per_unit: int = POINTS_PER_UNIT, ridge: float = 1e-6,
                          outside_weight: float = OUTSIDE_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, w, inside): P (128 x 256) the weighted ridge least-squares map with

        P·E(w - 1) ≈ φ(62.5·clamp(w, w_min, w_max))

    on the guidance scales w (evenly spaced over `saturate`, widened to hold `guidance_range` = [w_min, w_max]),
    each scale outside the range weighing `outside_weight` of one inside (`inside` marks those). Inside, P is the
    sinusoid features' fit; outside, it holds them at the nearer end of the range instead of extrapolating the fit."""
    lo, hi = guidance_range
    start, stop = min(saturate[0], lo), max(saturate[1], hi)
    w = torch.linspace(start, stop, round((stop - start) * points_per_unit) + 1, dtype=torch.float64)
    inside = (w >= lo) & (w <= hi)
    weight = torch.where(inside, 1.0, outside_weight).double()
    feats = guidance_embedding((w - 1.0).float()).double()  # E(w - 1) in float32, as diffusers computes it
    target = sinusoid(w.clamp(lo, hi) * GUIDANCE_EMBED_SCALE).double()
    weighted = feats * weight[:, None]
    # Ridge-regularised: E's fast columns make the plain least-squares weights huge (float32 noise amplifiers).
    gram = weighted.T @ feats + ridge * weight.sum() * torch.eye(feats.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, weighted.T @ target).T, w, inside  # float64


def convert_conditioning(unet: nn.Module, guidance_range: tuple[float, float], ridge: float = 1e-6) -> dict:
    """Turn a "sinusoid" student UNet into a "diffusers-guidance" one, in place; return the fit's residuals.

    linear_1(s + A_t·φ(t) + A_w·φ(62.5·w)) = linear_1(s + A_t·(φ(t) - φ(0)) + B·E(w - 1)) + error, with
    linear_1's bias += W_1·A_t·φ(0) (exact at every t) and B = A_w·P, P the saturating_projection of
    `guidance_range` (approximate in w: E has other frequencies). Outside the range, where only plain diffusers
    takes the student, B·E(w - 1) stays near the features of the nearer end of the range (SATURATION_RANGE)."""
    emb = unet.time_embedding
    if unet_conditioning(unet) != LEGACY_CONDITIONING or emb.cond_proj.in_features != TIME_COND_PROJ_DIM:
        raise ValueError("only a 'sinusoid' student UNet can be converted")
    if emb.linear_1.bias is None:
        raise ValueError("the time embedding's linear_1 has no bias to fold the constant t = 0 term into")
    a = emb.cond_proj.weight.detach().double()
    a_t, a_w = a[:, :EMBED_DIM], a[:, EMBED_DIM:]
    proj, w, inside = saturating_projection(guidance_range, ridge=ridge)
    b = a_w @ proj  # the fit is linear in the target: A_w·P
    lo, hi = guidance_range
    target = sinusoid(w.clamp(lo, hi) * GUIDANCE_EMBED_SCALE).double() @ a_w.T
    residual = guidance_embedding((w - 1.0).float()).double() @ b.T - target
    phi0 = sinusoid(torch.zeros(1))[0].double()
    with torch.no_grad():
        emb.linear_1.bias += (emb.linear_1.weight.double() @ (a_t @ phi0)).to(emb.linear_1.bias.dtype)
        add_condition_projection(unet, DEFAULT_CONDITIONING)
        emb.cond_proj.weight.copy_(b)
        emb.cond_proj.time_weight.copy_(a_t)
    outside = ~inside  # empty where the trained range covers SATURATION_RANGE
    held = float(residual[outside].norm() / target[outside].norm()) if bool(outside.any()) else 0.0
    return {"guidance_range": list(guidance_range), "saturated_over": [float(w[0]), float(w[-1])],
            "points_per_unit": POINTS_PER_UNIT, "outside_weight": OUTSIDE_WEIGHT, "ridge": ridge,
            "relative_residual": float(residual[inside].norm() / target[inside].norm()),
            "max_abs_residual": float(residual[inside].abs().max()), "outside_relative_residual": held}
