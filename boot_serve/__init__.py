"""boot_serve: pipelines, export, Triton launcher, clients and benchmark for BOOT students."""

__all__ = ["BootPipeline"]


def __getattr__(name: str):
    # Lazy: `import boot_serve` stays cheap for the Triton models and clients that never need torch.
    if name == "BootPipeline":
        from boot.pipeline import BootPipeline

        return BootPipeline
    raise AttributeError(f"module 'boot_serve' has no attribute {name!r}")


# OnnxPipeline (boot_serve/onnx_pipeline.py): ONNX Runtime only, importable without torch.
__all__.append("OnnxPipeline")
_getattr_before_onnx = __getattr__


def __getattr__(name: str):  # noqa: F811 - chains the lazy imports above
    if name == "OnnxPipeline":
        from boot_serve.onnx_pipeline import OnnxPipeline

        return OnnxPipeline
    return _getattr_before_onnx(name)
