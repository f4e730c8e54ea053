"""boot_serve: pipelines, export, Triton launcher, clients and benchmark for BOOT students.

`import boot_serve` imports nothing else: each public name below comes from its module on first
use, so that the Triton models, the guards and the clients never load PyTorch.
"""

import importlib

# Public name -> the module that defines it.
_LAZY = {
    "BootPipeline": "boot.pipeline",  # PyTorch
    "OnnxPipeline": "boot_serve.onnx_pipeline",  # ONNX Runtime only
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'boot_serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
