"""Average the UNet weights of several students of one lineage into a new student folder (a weight soup).

    python -m boot_tools.soup OUT BASE_STUDENT SOURCE [SOURCE ...]

OUT is a copy of BASE_STUDENT (its VAE, scheduler and boot.json) whose UNet is the element-wise mean,
in float32, of the SOURCEs: student folders (their unet/) or `distill.run` checkpoint folders
(checkpoints/step-N, their EMA weights). Sources must share the UNet architecture; averaging only makes
sense for students fine-tuned from a common start (docs/ablations.md). boot.json gains a "soup" entry
naming the sources.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from boot import checkpoint

UNET = "unet/diffusion_pytorch_model.safetensors"


def weights(source: Path) -> dict[str, torch.Tensor]:
    if (source / UNET).exists():
        return {k: v.float() for k, v in load_file(source / UNET).items()}
    ema = {k: v.float() for k, v in checkpoint.module_state(source, "ema").items()}
    if not ema:
        raise SystemExit(f"{source}: neither a student folder ({UNET}) nor a checkpoint with EMA weights")
    return ema


def soup(out: Path, base: Path, sources: list[Path]) -> None:
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    mean = weights(sources[0])
    for source in sources[1:]:
        w = weights(source)
        if w.keys() != mean.keys() or any(w[k].shape != mean[k].shape for k in mean):
            raise SystemExit(f"{source}: UNet weights differ in names or shapes from {sources[0]}")
        for k in mean:
            mean[k] += w[k]
    shutil.copytree(base, out)
    save_file({k: (v / len(sources)).contiguous() for k, v in mean.items()}, out / UNET, metadata={"format": "pt"})
    info = json.loads((out / "boot.json").read_text())
    info["soup"] = [str(s) for s in sources]
    (out / "boot.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{out}: mean of {len(sources)} UNets")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="new student folder (must not exist)")
    p.add_argument("base", type=Path, help="student folder copied for everything but the UNet weights")
    p.add_argument("sources", type=Path, nargs="+", help="student folders or distill.run checkpoint folders")
    args = p.parse_args(argv)
    soup(args.out, args.base, args.sources)


if __name__ == "__main__":
    main()
