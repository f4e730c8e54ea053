"""Store a student folder's UNet in float16 in place (as the shipped models are; loads as float32).

    python scripts/halve_unet.py STUDENT_DIR
"""

import sys

from safetensors.torch import load_file, save_file

path = f"{sys.argv[1]}/unet/diffusion_pytorch_model.safetensors"
save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
