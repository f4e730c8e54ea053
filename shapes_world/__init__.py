"""The shapes world: a procedural text-to-image world with an exact judge, and the trainer of the
shipped teacher on it (docs/teacher.md).

    shapes_world.world        caption grammar and its splits, scene layout, the renderer, the data stream
    shapes_world.judge        the exact judge: an image's blobs checked against what a caption names
    shapes_world.plots        captioned sample sheets and loss curves
    shapes_world.recipe       the teacher's recipe (TeacherConfig) and the networks it builds
    shapes_world.teacher      the teacher's training stages: vae, latents, unet, export
    shapes_world.text_states  `python -m shapes_world.text_states precompute DIR`: the captions' text states
    python -m shapes_world    trains the teacher (also `boot-shapes-teacher`)

Layers point one way: this package imports only `boot`; `distill` builds on it (tests/test_layers.py).
"""
