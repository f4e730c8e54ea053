"""boot's core: what distillation (`distill/`), serving (`boot_serve/`) and the demo build on.

    boot.method     BOOT itself: noise schedule, teacher x0-wrapper, student, losses (docs/method.md)
    boot.folders    teacher and student folder formats and their loaders (text stacks included)
    boot.text       the shapes models' MiniLM text encoder, loaded offline from its PyPI package
    boot.sdxl       the SDXL family's two text encoders, pooled embeddings and time ids
    boot.contract   the client contract: input checks, the seed -> noise rule, the image postprocess
    boot.pipeline   BootPipeline: a student folder as a one-step PyTorch pipeline
    boot.samplers   TeacherSampler: the teacher's own DDIM sampler at k steps
    boot.checkpoint atomic, pickle-free training checkpoints (distillation runs, the shapes teacher's stages)

Layers point one way: nothing here imports `distill`, `boot_serve` or `demo` (tests/test_layers.py).
The old module paths (`distill.boot`, `distill.models`, `boot.sdxl`,
`boot_serve.pipeline`) stay importable as aliases of these modules.
"""
