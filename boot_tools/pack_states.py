"""Pack precomputed text states small enough to carry to a GPU machine (64 MiB of files), and unpack them.

    python -m boot_tools.pack_states pack   STATES_DIR PACKED_DIR   # STATES_DIR from shapes_world.text_states
    python -m boot_tools.pack_states unpack PACKED_DIR STATES_DIR   # on the GPU machine (boot_tools/gpu/env.sh)

pack reads a folder with states.safetensors (input_ids and fp16 states) and the tokenizer files and writes
input_ids.npy, shape.npy, states.hi.xz, states.lo.xz and the tokenizer files; unpack writes the folder back.
fp16 states compress poorly as they are (xz: 28 MB); split into their high and low bytes first, the
high bytes (sign, exponent) are very regular, and the pair compresses to 23.7 MB. Lossless.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    table = load_file(str(src / "states.safetensors"))
    words = table["states"].view(np.uint16)
    np.save(dst / "input_ids.npy", table["input_ids"])
    np.save(dst / "shape.npy", np.array(words.shape))
    for name, plane in (("hi", words >> 8), ("lo", words & 0xFF)):
        (dst / f"states.{name}.xz").write_bytes(lzma.compress(plane.astype(np.uint8).tobytes(), preset=9))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shape = tuple(np.load(src / "shape.npy"))
    hi, lo = (np.frombuffer(lzma.decompress((src / f"states.{n}.xz").read_bytes()), np.uint8).astype(np.uint16)
              for n in ("hi", "lo"))
    states = ((hi << 8) | lo).reshape(shape).view(np.float16)
    save_file({"input_ids": np.load(src / "input_ids.npy"), "states": states}, str(dst / "states.safetensors"))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m boot_tools.pack_states", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("pack", "unpack"), help="pack STATES_DIR into PACKED_DIR, or unpack back")
    p.add_argument("src", type=Path, help="folder read: the states (pack) or the packed files (unpack)")
    p.add_argument("dst", type=Path, help="folder written (created if missing)")
    args = p.parse_args(argv)
    {"pack": pack, "unpack": unpack}[args.action](args.src, args.dst)


if __name__ == "__main__":
    main()
