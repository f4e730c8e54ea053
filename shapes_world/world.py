"""The "shapes" world (docs/teacher.md): caption grammar and its splits, scene layout, renderer, data stream.

Geometry convention: continuous image coordinates, pixel (row i, column j) covers the square
[j, j+1) x [i, i+1); x grows to the right, y grows downwards. A shape's reference point is
(cx, cy); for the triangle that is the centre of its bounding box, not its centroid.

Anti-aliasing: a pixel's value is coverage * colour over black, coverage computed exactly for
squares and by 8x8 supersampling for circles and triangles.

The judge that reads these scenes back off an image is `shapes_world.judge`.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

CANVAS = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 50),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 6.0, "large": 11.0}
SIZE_JITTER = 1.0
GRID = (16.0, 32.0, 48.0)
POSITION_JITTER = 3.0
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (column, row)
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
RELATIONS = ("left of", "right of", "above", "below")
SQUARE_SIDE = 1.8  # side = 1.8 * r
# Minimum number of fully black pixels between two objects, so each stays its own blob even
# after a little blur.
MIN_GAP_PX = 2
_SUPERSAMPLE = 8


# --------------------------------------------------------------------------------------------
# Scene specification and grammar
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption names it; None means "not named, drawn at random"."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for: one or two objects and, for two, an optional relation."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # holds from objects[0] to objects[1]


@dataclass(frozen=True)
class PlacedObject:
    color: str
    shape: str
    r: float
    cx: float
    cy: float

    @property
    def cell(self) -> tuple[int, int]:
        return cell_of(self.cx), cell_of(self.cy)


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_POS_RE = "|".join(sorted(POSITIONS, key=len, reverse=True))
_SINGLE = re.compile(
    rf"^a (?:(?P<size>small|large) )?(?P<color>{_COLOR_RE}) (?P<shape>{_SHAPE_RE})"
    rf"(?: (?:in|at) the (?P<pos>{_POS_RE}))?$"
)
_TWO = re.compile(
    rf"^a (?P<c1>{_COLOR_RE}) (?P<s1>{_SHAPE_RE}) (?P<rel>left of|right of|above|below|and) "
    rf"a (?P<c2>{_COLOR_RE}) (?P<s2>{_SHAPE_RE})$"
)


# Small wording variations mapped onto the grammar's words (whole words only).
_SYNONYMS = [
    (r"\bcentre\b|\bmiddle\b", "center"), (r"\bbig\b", "large"), (r"\blittle\b", "small"),
    (r"\bto the (left|right) of\b", r"\1 of"), (r"\bon the (left|right) of\b", r"\1 of"),
    (r"\b(?:under|beneath|underneath)\b", "below"), (r"\bover\b", "above"),
    (r"\bon the\b", "in the"), (r"\ban\b", "a"),
]


def normalize(caption: str) -> str:
    """Lower-case, collapse whitespace and hyphens, drop one trailing full stop, and map small
    wording variations ("top-left", "centre", "to the left of", "big", ...) onto the grammar."""
    text = " ".join(caption.strip().lower().replace("-", " ").split())
    text = text[:-1].rstrip() if text.endswith(".") else text
    for pattern, repl in _SYNONYMS:
        text = re.sub(pattern, repl, text)
    return text


def parse(caption: str) -> SceneSpec:
    """Parse a caption of the shapes grammar; raise ValueError naming what is wrong."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    text = normalize(caption)
    if not text:
        raise ValueError("caption is empty")
    if m := _SINGLE.match(text):
        obj = ObjectSpec(m["color"], m["shape"], m["size"], m["pos"])
        return SceneSpec((obj,))
    if m := _TWO.match(text):
        rel = None if m["rel"] == "and" else m["rel"]
        return SceneSpec((ObjectSpec(m["c1"], m["s1"]), ObjectSpec(m["c2"], m["s2"])), rel)
    raise ValueError(
        f"caption {caption!r} is outside the shapes grammar; expected e.g. "
        "'a [small|large] <color> <shape> [in the|at the <position>]' or "
        "'a <color> <shape> <left of|right of|above|below|and> a <color> <shape>', with "
        f"colors {list(COLORS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}"
    )


def caption_of(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """The canonical caption of a spec (the preposition before a position is drawn from rng)."""
    if len(spec.objects) == 1:
        o = spec.objects[0]
        words = ["a"] + ([o.size] if o.size else []) + [o.color, o.shape]
        if o.position:
            prep = "in" if rng is None else ("in", "at")[int(rng.integers(2))]
            words += [prep, "the", o.position]
        return " ".join(words)
    a, b = spec.objects
    return f"a {a.color} {a.shape} {spec.relation or 'and'} a {b.color} {b.shape}"


# --------------------------------------------------------------------------------------------
# Compositional split: attribute combinations that no "train" caption contains
# --------------------------------------------------------------------------------------------
# Colour–shape pairs held out wherever they occur (a single object, or either object of two):
# each colour and each shape still appears in training, only these pairings never do.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("yellow", "circle"), ("green", "square"))
# (first shape, relation, second shape) held out in two-object captions, whatever the colours, together
# with the converse wording of the same layout ("a triangle below a circle" for "a circle above a triangle").
HELD_OUT_RELATIONS: tuple[tuple[str, str, str], ...] = (("circle", "above", "triangle"),
                                                        ("square", "left of", "circle"))
_CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def held_out(spec: SceneSpec | str) -> list[str]:
    """The held-out compositions a caption (or spec) contains, e.g. ["purple triangle",
    "circle above triangle"]; empty for a caption the "train" split can hold."""
    if isinstance(spec, str):
        spec = parse(spec)
    found = [f"{o.color} {o.shape}" for o in spec.objects if (o.color, o.shape) in HELD_OUT_PAIRS]
    if spec.relation is not None:
        a, b = (o.shape for o in spec.objects)
        for s1, rel, s2 in HELD_OUT_RELATIONS:
            if (a, spec.relation, b) in ((s1, rel, s2), (s2, _CONVERSE[rel], s1)):
                found.append(f"{s1} {rel} {s2}")
    return list(dict.fromkeys(found))


# split -> (random stream, which drawn specs it keeps). "all" is the unfiltered grammar of the stream
# "train" draws from (the shipped teacher and the shipped student were trained on it); "train" redraws
# every spec with a held-out composition; "eval" is unfiltered and independent of both (the reports'
# captions); "seen" and "unseen" are further independent streams with only, or without any, held-out
# compositions (rejection sampling, so "unseen" has more two-object captions than "eval").
_SPLITS: dict[str, tuple[int, object]] = {
    "all": (0, lambda spec: True),
    "train": (0, lambda spec: not held_out(spec)),
    "eval": (1, lambda spec: True),
    "unseen": (2, lambda spec: bool(held_out(spec))),
    "seen": (3, lambda spec: not held_out(spec)),
}
SPLITS = tuple(_SPLITS)


def _split_rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    return np.random.default_rng([int(seed), 0x5A4E, _SPLITS[split][0]])


def _draw_spec(rng: np.random.Generator) -> SceneSpec:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    colors, positions = list(COLORS), list(POSITIONS)
    if rng.random() < 0.5:
        size = pick(list(SIZES)) if rng.random() < 0.5 else None
        pos = pick(positions) if rng.random() < 0.6 else None
        return SceneSpec((ObjectSpec(pick(colors), pick(SHAPES), size, pos),))
    while True:
        a = ObjectSpec(pick(colors), pick(SHAPES))
        b = ObjectSpec(pick(colors), pick(SHAPES))
        if a != b:
            break
    return SceneSpec((a, b), pick([*RELATIONS, None]))


def sample_captions(n: int, seed: int, split: str = "train") -> list[str]:
    """n captions of the grammar: half single-object, half two-object (in expectation, before a
    split's filter). `split="eval"` uses a random stream disjoint from `"train"` for the same seed;
    "train" never holds a held-out composition (HELD_OUT_PAIRS, HELD_OUT_RELATIONS), "unseen" holds
    at least one in every caption, "seen" none (see _SPLITS).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _split_rng(seed, split)
    keep = _SPLITS[split][1]
    captions = []
    for _ in range(n):
        spec = _draw_spec(rng)
        while not keep(spec):
            spec = _draw_spec(rng)
        captions.append(caption_of(spec, rng))
    return captions


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def cell_of(coord: float) -> int:
    """The grid cell (0, 1 or 2) a coordinate falls in, along either axis."""
    return 0 if coord < 24.0 else (1 if coord < 40.0 else 2)


def _coverage(obj: PlacedObject) -> np.ndarray:
    """(64, 64) float32 coverage in [0, 1] of one shape."""
    cov = np.zeros((CANVAS, CANVAS), np.float32)
    half = obj.r * SQUARE_SIDE / 2 if obj.shape == "square" else obj.r
    x0, x1 = max(int(np.floor(obj.cx - half)), 0), min(int(np.ceil(obj.cx + half)), CANVAS)
    y0, y1 = max(int(np.floor(obj.cy - half)), 0), min(int(np.ceil(obj.cy + half)), CANVAS)
    if obj.shape == "square":  # exact area of the pixel/square intersection
        xs, ys = np.arange(x0, x1), np.arange(y0, y1)
        wx = np.clip(np.minimum(xs + 1, obj.cx + half) - np.maximum(xs, obj.cx - half), 0, 1)
        wy = np.clip(np.minimum(ys + 1, obj.cy + half) - np.maximum(ys, obj.cy - half), 0, 1)
        cov[y0:y1, x0:x1] = np.outer(wy, wx)
        return cov
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    px = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)  # (W*S,)
    py = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)  # (H*S,)
    X, Y = np.meshgrid(px - obj.cx, py - obj.cy)  # (H*S, W*S), relative to the centre
    if obj.shape == "circle":
        inside = X * X + Y * Y <= obj.r * obj.r
    else:  # triangle, apex (0, -r), base from (-r, r) to (r, r): |X| <= (Y + r) / 2
        inside = (Y <= obj.r) & (np.abs(X) <= (Y + obj.r) / 2)
    h, w = y1 - y0, x1 - x0
    cov[y0:y1, x0:x1] = inside.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def _too_close(a: np.ndarray, b: np.ndarray) -> bool:
    grown = ndimage.binary_dilation(a > 0, iterations=MIN_GAP_PX, structure=np.ones((3, 3)))
    return bool((grown & (b > 0)).any())


def _cells_for(relation: str | None, rng: np.random.Generator) -> tuple[tuple, tuple]:
    cells = list(itertools.product(range(3), range(3)))  # (column, row)
    ok = {
        None: lambda a, b: a != b,
        "left of": lambda a, b: a[0] < b[0],
        "right of": lambda a, b: a[0] > b[0],
        "above": lambda a, b: a[1] < b[1],
        "below": lambda a, b: a[1] > b[1],
    }[relation]
    pairs = [(a, b) for a in cells for b in cells if ok(a, b)]
    return pairs[int(rng.integers(len(pairs)))]


def _place(o: ObjectSpec, cell: tuple[int, int], rng: np.random.Generator) -> PlacedObject:
    size = o.size or list(SIZES)[int(rng.integers(len(SIZES)))]
    r = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    cx = GRID[cell[0]] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = GRID[cell[1]] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    return PlacedObject(o.color, o.shape, float(r), float(cx), float(cy))


def layout(spec: SceneSpec, rng: np.random.Generator) -> list[PlacedObject]:
    """Place the objects of a spec, drawing unnamed attributes from rng; never overlapping."""
    if len(spec.objects) == 1:
        o = spec.objects[0]
        cell = POSITIONS[o.position] if o.position else tuple(int(v) for v in rng.integers(3, size=2))
        return [_place(o, cell, rng)]
    for _ in range(10_000):
        cell_a, cell_b = _cells_for(spec.relation, rng)
        a, b = _place(spec.objects[0], cell_a, rng), _place(spec.objects[1], cell_b, rng)
        if not _too_close(_coverage(a), _coverage(b)):
            return [a, b]
    raise RuntimeError(f"could not lay out {spec} without overlap")  # never seen in practice


def _caption_key(caption: str) -> int:
    return int.from_bytes(hashlib.sha256(normalize(caption).encode()).digest()[:8], "little")


def draw(objects: list[PlacedObject]) -> np.ndarray:
    """(64, 64, 3) uint8 image of placed objects on black."""
    img = np.zeros((CANVAS, CANVAS, 3), np.float32)
    for obj in objects:
        img += _coverage(obj)[..., None] * np.asarray(COLORS[obj.color], np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_array(caption: str, seed: int) -> np.ndarray:
    """(64, 64, 3) uint8 render, deterministic in (caption, seed)."""
    spec = parse(caption)
    rng = np.random.default_rng([int(seed), _caption_key(caption)])
    return draw(layout(spec, rng))


def render(caption: str, seed: int) -> Image.Image:
    """64x64 RGB render of a caption, deterministic in (caption, seed)."""
    return Image.fromarray(render_array(caption, seed), "RGB")


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------
def iterate_batches(
    batch_size: int, seed: int, split: str = "train", prefetch: int = 4
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Endless (images (B, 64, 64, 3) uint8, captions) batches, rendered on a worker thread.

    Batch k is the same for a given (batch_size, seed, split) however fast it is consumed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        for k in itertools.count():
            if stop.is_set():
                return
            captions = sample_captions(batch_size, seed * 1_000_003 + k, split)
            images = np.stack([render_array(c, seed * 1_000_003 + k) for c in captions])
            while not stop.is_set():
                try:
                    out.put((images, captions), timeout=0.1)
                    break
                except queue.Full:
                    continue

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            yield out.get()
    finally:
        stop.set()
