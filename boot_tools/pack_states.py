"""Precomputed text states, packed small enough to travel to a GPU machine that takes at most 64 MiB of files.

    python scripts/pack_states.py pack   STATES_DIR PACKED_DIR   # from `python -m distill.text precompute`
    python scripts/pack_states.py unpack PACKED_DIR STATES_DIR   # on the GPU machine

fp16 states compress poorly as they are (xz: 28 MB); split into their high and low bytes first, the
high bytes (sign, exponent) are very regular, and the pair compresses to 23.7 MB. Lossless.
"""

import lzma
import shutil
import sys
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


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
