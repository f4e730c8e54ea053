"""Store a student folder's UNet in float16, in place (as the shipped models are; it loads as float32).

    python -m boot_tools.halve_unet STUDENT_DIR

Input: a student folder with unet/diffusion_pytorch_model.safetensors. Output: the same file with every
tensor cast to float16 (half the size; small enough to carry off a GPU machine in one tarball).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

UNET = "unet/diffusion_pytorch_model.safetensors"


def halve(student: Path) -> Path:
    path = student / UNET
    save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.halve_unet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", type=Path, help="student folder whose unet/ is rewritten in float16")
    args = p.parse_args(argv)
    if not (args.student / UNET).is_file():
        p.error(f"{args.student}: no {UNET}")
    print(f"{halve(args.student)}: float16")


if __name__ == "__main__":
    main()
