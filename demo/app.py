"""Gradio demo of a BOOT student: prompt in, one-step images out, the teacher beside it.

    python -m demo.app --url 127.0.0.1:8000                  # the Triton server (boot_serve.serve)
    python -m demo.app --url 127.0.0.1:8001 --protocol grpc
    python -m demo.app --repository model_repository         # no server: ONNX Runtime in-process
    python -m demo.app --url 127.0.0.1:8000 --teacher pretrained/shapes-teacher   # + side by side

Widgets only: the backends, timing and error messages live in
boot_serve/demo_backend.py. Binds 127.0.0.1 unless --host says otherwise; never a share link.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from boot.cli import Parser
from boot_serve import demo_backend as db
from boot_serve.triton_process import LOCAL_HOSTS

# Every image whole, as large as its grid cell allows, enlarged without smoothing (the models make
# 64x64 pixels; a blurred enlargement would show detail that is not there), captions under the images.
CSS = """
.boot-gallery .grid-wrap { height: auto !important; max-height: none !important; overflow: visible !important; }
.boot-gallery .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important; }
.boot-gallery .gallery-item, .boot-gallery .thumbnail-item { width: 100% !important; height: auto !important;
  max-width: none !important; max-height: none !important; aspect-ratio: auto !important; }
.boot-gallery .thumbnail-item { display: flex !important; flex-direction: column; }
.boot-gallery img { image-rendering: pixelated; width: 100% !important; height: auto !important;
  aspect-ratio: 1 / 1; object-fit: contain !important; }
.boot-gallery .caption-label { position: static !important; max-width: none !important; text-align: center; }
"""
GALLERY_COLUMNS = 2  # each gallery is half of the output column: 2 x 4 cells hold the 8 images
N_EXAMPLES = 8
GALLERY = {"format": "png", "columns": GALLERY_COLUMNS, "object_fit": "contain", "height": "auto",
           "allow_preview": False, "elem_classes": ["boot-gallery"]}


def build_ui(session: db.DemoSession, examples: list[str]):
    import gradio as gr

    lo, hi = session.guidance_range
    teacher = session.teacher
    known = getattr(session.backend, "guidance_known", True)
    with gr.Blocks(title="BOOT: one-step text-to-image", analytics_enabled=False) as ui:
        gr.Markdown("## BOOT: one-step text-to-image\n"
                    f"Student served by **{session.backend.label}**. One network evaluation per image; "
                    "the same prompt, seed and guidance give the same image everywhere.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", placeholder=examples[0] if examples else "a red circle",
                                    lines=1, max_lines=3, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=db.MAX_UI_SEED,
                                     elem_id="seed")
                    random_seed = gr.Checkbox(label="random seed", value=False, elem_id="random-seed")
                guidance = gr.Slider(lo, hi, value=session.guidance_scale, step=0.1, elem_id="guidance",
                                     label="Guidance scale" + ("" if known else " (student's range unknown here; "
                                                                              "the server checks it)"))
                n_images = gr.Slider(1, db.MAX_IMAGES, value=1, step=1, label="Number of images",
                                     elem_id="n-images")
                compare = gr.Checkbox(label="Side by side with the teacher", value=False,
                                      visible=teacher is not None, elem_id="compare")
                steps = gr.Slider(1, 100, value=teacher.default_steps if teacher else 50, step=1,
                                  label="Teacher DDIM steps (k)", visible=teacher is not None,
                                  elem_id="teacher-steps")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(examples=[[c] for c in examples], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    gallery = gr.Gallery(label="Student, 1 step", elem_id="gallery", **GALLERY)
                    teacher_gallery = gr.Gallery(label="Teacher, DDIM k steps", elem_id="teacher-gallery",
                                                 visible=False, **GALLERY)

        def generate(prompt, seed, random_seed, guidance, n_images, compare, steps):
            if random_seed:
                seed = db.random_seed()
            out = session.run(prompt, seed, n_images, guidance, compare, int(steps))
            if out.errors:
                gr.Warning(out.errors[0])
            caption = [f"seed {s}" for s in out.seeds]
            return (seed, list(zip(out.images, caption)), list(zip(out.teacher_images, caption)),
                    session.status(out, int(steps)))

        inputs = [prompt, seed, random_seed, guidance, n_images, compare, steps]
        outputs = [seed, gallery, teacher_gallery, status]
        for trigger in (button.click, prompt.submit):
            trigger(generate, inputs, outputs, concurrency_limit=4)
        compare.change(lambda on: gr.Gallery(visible=on), compare, teacher_gallery)
    return ui


def parser() -> Parser:
    p = Parser(prog="python -m demo.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None,
                   help="Triton server host:port (default: none, run the --repository pipeline in-process)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton protocol (default http)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="exported model repository: the in-process backend without --url, and the "
                        "guidance range with it (default model_repository)")
    p.add_argument("--student", type=Path, default=None,
                   help="student folder: PyTorch backend when there is no --url and no exported repository")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher folder for the side-by-side view (default: none, view hidden)")
    p.add_argument("--port", type=int, default=7860, help="web server port (default 7860)")
    x = p.operator_group("web server and examples (operators)")
    x.add_argument("--host", default="127.0.0.1", help="address the web server binds (default 127.0.0.1)")
    x.add_argument("--examples-seed", type=int, default=0, help="which example prompts to show (default 0)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error("--port must be in [1, 65535]")
    return args


def main(argv: list[str] | None = None) -> int:
    from boot_serve.prompts import example_prompts

    args = parse_args(argv)
    if args.host not in LOCAL_HOSTS:
        print(f"warning: the demo binds {args.host}, not 127.0.0.1: anyone who can reach it can generate "
              "images (there is no authentication)", file=sys.stderr)
    try:
        backend = db.load_backend(args.url, args.protocol, args.repository, args.student)
        teacher = db.TeacherBackend(args.teacher) if args.teacher else None
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ui = build_ui(db.DemoSession(backend, teacher), example_prompts(N_EXAMPLES, args.examples_seed * N_EXAMPLES))
    ui.queue(default_concurrency_limit=4)
    ui.launch(server_name=args.host, server_port=args.port, share=False, show_error=False, ssr_mode=False,
              css=CSS, footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
