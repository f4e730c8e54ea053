"""boot_serve: pipelines, export, Triton launcher, clients and benchmark for BOOT students."""

__all__ = ["BootPipeline"]


def __getattr__(name: str):
    # Lazy: `import boot_serve` stays cheap for the Triton models and clients that never need torch.
    if name == "BootPipeline":
        from boot_serve.pipeline import BootPipeline

        return BootPipeline
    raise AttributeError(f"module 'boot_serve' has no attribute {name!r}")
