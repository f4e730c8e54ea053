"""Pictures of the shapes world's models: captioned sample sheets and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shapes_world.world import CANVAS


def grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 8,
         scale: int = 3) -> Image.Image:
    """A PNG-ready grid of images, each captioned underneath when captions are given."""
    cell_w, img_h = CANVAS * scale, CANVAS * scale
    text_h = 28 if captions else 0
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell_w + 4), rows * (img_h + text_h + 4)), (40, 40, 40))
    pen = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * (cell_w + 4), (i // cols) * (img_h + text_h + 4)
        sheet.paste(im.resize((cell_w, img_h), Image.NEAREST), (x, y))
        if captions:
            words, lines = captions[i].split(), [""]
            for w in words:
                if len(lines[-1]) + len(w) + 1 > cell_w // 6:
                    lines.append("")
                lines[-1] = (lines[-1] + " " + w).strip()
            pen.multiline_text((x + 2, y + img_h + 1), "\n".join(lines[:2]), fill=(230, 230, 230),
                                 spacing=1)
    return sheet


def plot_losses(log_path: Path, png_path: Path, keys: list[str], title: str) -> None:
    """Loss curve PNG (raw and smoothed) from a JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([r["step"] for r in records])
    for key in keys:
        vals = np.array([r[key] for r in records])
        ax.plot(steps, vals, alpha=0.25)
        k = max(1, len(vals) // 50)
        ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
