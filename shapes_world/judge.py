"""The exact judge of the shapes world (docs/teacher.md): the blobs of an image, each read as one
object (colour, shape, size, cell), checked against what a caption names.

Shapes are told apart by how they fill their soft bounding box and by their vertical skew; sizes by
the radius their area implies (the renderer's constants are in `shapes_world.world`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from shapes_world.world import COLORS, POSITIONS, SQUARE_SIDE, ObjectSpec, cell_of, parse

# Soft fill of the soft bounding box: triangle 0.5, circle pi/4, square 1.0 in the continuum.
_FILL_TRIANGLE_MAX = 0.62
_SKEW_TRIANGLE_MAX = -0.2
_FILL_CIRCLE_MAX = 0.89
_AREA_FACTOR = {"circle": np.pi, "square": SQUARE_SIDE**2, "triangle": 2.0}  # area = k r^2
_SIZE_THRESHOLD_R = 8.5
_FOREGROUND = 0.4  # coverage above which a pixel belongs to a blob
_MIN_BLOB_AREA = 12.0  # px; smaller specks are noise
_PALETTE = np.array(list(COLORS.values()), np.float32)
_CHROMA = _PALETTE / _PALETTE.max(axis=1, keepdims=True)


@dataclass(frozen=True)
class Blob:
    """A connected region of one colour, with what the judge reads off it."""

    color: str
    shape: str
    size: str
    cell: tuple[int, int]  # (column, row)
    area: float
    fill: float
    skew: float
    r: float
    center: tuple[float, float]


@dataclass
class Verdict:
    """Whether an image satisfies a caption, and which attribute failed if not.

    `attributes` maps "count", "color", "shape", "size", "position", "relation" (those the
    caption constrains) to whether the best assignment of blobs to named objects satisfies it.
    """

    ok: bool
    attributes: dict[str, bool] = field(default_factory=dict)
    blobs: list[Blob] = field(default_factory=list)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return arr.astype(np.float32)


def _classify_shape(fill: float, skew: float) -> str:
    """Upright triangles are bottom-heavy (y-skew -0.57 in the continuum, circles and squares
    0) and half-fill their box; circles fill pi/4 of it, squares all of it."""
    if skew < _SKEW_TRIANGLE_MAX or fill < _FILL_TRIANGLE_MAX:
        return "triangle"
    return "circle" if fill < _FILL_CIRCLE_MAX else "square"


def find_blobs(image) -> list[Blob]:
    """Connected non-black regions of an image, each classified by colour, shape, size, cell."""
    arr = _as_array(image)
    brightness = arr.max(axis=2) / 235.0
    labels, n = ndimage.label(brightness > _FOREGROUND, structure=np.ones((3, 3)))
    blobs = []
    for idx in range(1, n + 1):
        mask = labels == idx
        core = mask & (brightness >= 0.7 * brightness[mask].max())
        mean = arr[core].mean(axis=0)
        chroma = mean / max(mean.max(), 1e-6)
        k = int(np.argmin(((_CHROMA - chroma) ** 2).sum(axis=1)))
        ref = _PALETTE[k]
        # Soft coverage of this colour over the blob grown by a pixel, so anti-aliased and
        # blurred edges count with their fraction.
        region = ndimage.binary_dilation(mask, iterations=1, structure=np.ones((3, 3)))
        region &= (labels == 0) | mask
        cov = np.clip(arr @ ref / float(ref @ ref), 0.0, 1.0) * region
        area = float(cov.sum())
        if area < _MIN_BLOB_AREA:
            continue
        width = float(cov.max(axis=0).sum())
        height = float(cov.max(axis=1).sum())
        fill = area / max(width * height, 1e-6)
        rows = np.arange(arr.shape[0], dtype=np.float64)[:, None]
        mean_y = float((cov * rows).sum()) / area
        var_y = float((cov * (rows - mean_y) ** 2).sum()) / area
        skew = float((cov * (rows - mean_y) ** 3).sum()) / area / max(var_y, 1e-6) ** 1.5
        shape = _classify_shape(fill, skew)
        r = float(np.sqrt(area / _AREA_FACTOR[shape]))
        ys, xs = np.nonzero(mask)
        cx = (xs.min() + xs.max() + 1) / 2.0
        cy = (ys.min() + ys.max() + 1) / 2.0
        blobs.append(
            Blob(
                color=list(COLORS)[k], shape=shape,
                size="small" if r < _SIZE_THRESHOLD_R else "large",
                cell=(cell_of(cx), cell_of(cy)), area=area, fill=fill, skew=skew, r=r,
                center=(float(cx), float(cy)),
            )
        )
    return blobs


def _object_checks(o: ObjectSpec, b: Blob) -> dict[str, bool]:
    checks = {"color": b.color == o.color, "shape": b.shape == o.shape}
    if o.size:
        checks["size"] = b.size == o.size
    if o.position:
        checks["position"] = b.cell == POSITIONS[o.position]
    return checks


def _relation_holds(relation: str, a: Blob, b: Blob) -> bool:
    (ca, ra), (cb, rb) = a.cell, b.cell
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def judge_detailed(caption: str, image) -> Verdict:
    """Judge an image against a caption, with a per-attribute breakdown (see `Verdict`)."""
    spec = parse(caption)
    blobs = find_blobs(image)
    n = len(spec.objects)
    best: dict[str, bool] | None = None
    for assigned in itertools.permutations(blobs, n) if len(blobs) >= n else []:
        attrs: dict[str, bool] = {}
        for o, b in zip(spec.objects, assigned):
            for key, value in _object_checks(o, b).items():
                attrs[key] = attrs.get(key, True) and value
        if spec.relation:
            attrs["relation"] = _relation_holds(spec.relation, *assigned)
        if best is None or sum(attrs.values()) > sum(best.values()):
            best = attrs
    if best is None:  # too few blobs: nothing about the objects can hold
        best = {"color": False, "shape": False}
        for o in spec.objects:
            best.update({k: False for k in ("size", "position") if getattr(o, k)})
        if spec.relation:
            best["relation"] = False
    attributes = {"count": len(blobs) == n, **best}
    return Verdict(ok=all(attributes.values()), attributes=attributes, blobs=blobs)


def judge(caption: str, image) -> bool:
    """True when the image shows exactly the objects the caption names (docs/teacher.md)."""
    return judge_detailed(caption, image).ok

