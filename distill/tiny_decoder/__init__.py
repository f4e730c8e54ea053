"""A tiny decoder distilled data-free: a diffusers AutoencoderTiny (TAESD's architecture) whose decoder
learns a student's full VAE decoder on latents the student (or its teacher) makes from prompts and noise.

    python -m distill.tiny_decoder --student pretrained/shapes-boot --out students/shapes-tiny-decoder
    python -m distill.tiny_decoder --student pretrained/shapes-boot --out ... --resume        # go on
    python -m distill.tiny_decoder --student ... --out ... --source teacher --teacher pretrained/shapes-teacher
    python -m distill.tiny_decoder --student ... --out ... --eval-n 300     # + judge accuracy, full vs tiny
    python -m distill.tiny_decoder --student ... --check students/shapes-tiny-decoder    # does it fit?

No image from outside: the training pairs are (latents, the full decoder's output on them). Latents
(--source): `student`, the student's one step from seeded noise at a guidance scale drawn from its range
for captions of the shapes grammar's train split: exactly what the served decoder gets; `teacher`, the
teacher's DDIM at --teacher-steps from the same; `both`, half each. The pool is made once into --work
(keyed by everything it depends on); held-out latents come the same way from the eval split's captions
and other seeds. Loss: --l1 x L1 + --mse x MSE between the tiny decoder's output and the full decoder's
output clamped to the image range [-1, 1] (the postprocess clamps anyway); AdamW, cosine learning rate.

The tiny decoder is sized to the student's VAE: the same latent channels, scaling factor and upsampling
(one decoder level per VAE level), --channels wide, --blocks AutoencoderTinyBlocks per level. It decodes
`latents / scaling_factor` as the full VAE does, so plain diffusers swaps it in:
`pipe.vae = AutoencoderTiny.from_pretrained(OUT)`. The encoder half of the folder is AutoencoderTiny's,
minimal and untrained (tiny_decoder.json says so): only decoding is distilled.

--out receives the AutoencoderTiny folder (config.json, diffusion_pytorch_model.safetensors),
tiny_decoder.json (format, student, teacher, latent source, steps, losses, sizes, the measurements),
samples.png (held-out latents: full decoder | tiny decoder | 4x their difference) and loss.png.
--work holds the latent pools, checkpoints (atomic; --resume continues from the newest, and a resumed run
draws the same batches as an uninterrupted one) and loss.jsonl.

Measured after training (into tiny_decoder.json): PSNR of the tiny decoder's uint8 images against the full
decoder's on the held-out latents, and decoder ms per image at batch 1, full vs tiny, in PyTorch and in
ONNX Runtime (interleaved). --eval-n N also judges the student's images with each decoder on N eval
captions (distill.evaluate's judge and seeds) into --out/eval/.

A tiny decoder whose latent channels or scaling factor differ from the student's is refused in one line
(exit 2), naming both values: when it is written and when it is loaded (--resume, --check, --eval-n).
"""

# The package: train.py (the recipe, the model, the latent pools, training), report.py (what a trained
# decoder measures and writes), __main__.py (the command line, `python -m distill.tiny_decoder`).
