"""In-process benchmark on one device: the student's three networks and the teacher's sampler, no server.

    python -m boot_serve.bench --in-process --device cuda --dtype fp16 --graphs manual \\
        --student pretrained/shapes-boot --teacher pretrained/shapes-teacher --sd15 --out docs/bench/gpu
    python -m boot_serve.bench --in-process --device cpu --dtype fp32 --graphs none --batches 1,2 \\
        --requests 3 --sd15-tiny --out /tmp/smoke                                  # scripts/gpu_bench.sh SMOKE=1

Models measured (each the same three stages: text encoder -> one UNet evaluation -> VAE decoder -> uint8
image copied to the host):
- `shipped`: the student folder (--student, BootPipeline's modules: text encoder, OneStepGenerator, VAE),
  with its teacher (--teacher: 50-step DDIM with classifier-free guidance, 2 UNet evaluations a step);
- `sd15-512` (--sd15): a student of the SD-1.5 architecture at 512x512 with random weights (CLIP ViT-L
  text encoder config, UNet 320/640/1280/1280, VAE 128/256/512/512, 77 tokens; nothing downloaded:
  the configs are written out below), its "teacher" the same UNet under 50 DDIM steps with guidance.
  --sd15-tiny swaps in a small config of the same shape of network (smoke runs on a CPU).

Per model: latency p50/p99 of a whole batch-1 request; images/s at each batch of --batches; the split
of a batch-1 request into text encoder / UNet / VAE decoder (each timed alone, device synchronised);
the teacher's p50 at batch 1 and the ratio. --graphs: `manual` captures one CUDA graph per stage and
batch bucket (static inputs, replayed; CUDA only), `compile` wraps each stage in
torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs), `none` runs eager. Written to --out:
bench.json, bench.md, bench.png, like the served benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from boot.cli import number_list
from boot_serve.bench.machine import hardware, load_average, versions

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Published one-step 512x512 numbers to read ours against (other GPUs, other software).
ANCHORS = [
    "SD-Turbo, 1 step at 512x512: about 9.4 ms on an RTX 4090 with TensorRT and a tiny VAE decoder",
    "SDXL-Turbo, 1 step at 512x512: 216 ms in PyTorch, 163 ms compiled, on an RTX 3090",
]
TEACHER_STEPS = 50


# --------------------------------------------------------------------------------------------
# Models: three stages as callables on device tensors
# --------------------------------------------------------------------------------------------
class Stages:
    """text(ids) -> states; unet(noise, states, w) -> latents (one evaluation); vae(latents) -> uint8
    images on the device; and the teacher's one UNet call with guidance for `teacher_steps`."""

    def __init__(self, name: str, text, unet_once, vae, teacher_eps, ids, latent_shape, device, dtype):
        self.name, self.text, self.unet_once, self.vae = name, text, unet_once, vae
        self.teacher_eps = teacher_eps
        self.ids, self.latent_shape, self.device, self.dtype = ids, latent_shape, device, dtype  # ids: (1, L)

    def inputs(self, batch: int, seed: int = 0) -> dict:
        import torch

        g = torch.Generator().manual_seed(seed)
        return {"ids": self.ids.repeat(batch, 1).to(self.device),
                "noise": torch.randn((batch, *self.latent_shape), generator=g).to(self.device, self.dtype),
                "w": torch.full((batch,), 4.5, device=self.device, dtype=torch.float32)}


def _to_uint8(decoded):
    import torch

    return ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def shipped_stages(student: Path, teacher: Path | None, device, dtype) -> Stages:
    """The student folder's networks (BootPipeline) and its teacher's UNet."""
    from boot.pipeline import BootPipeline

    pipe = BootPipeline.from_pretrained(student, device=device, dtype=dtype)
    encoder, tokenizer = pipe.text.text_encoder.to(device), pipe.text.tokenizer
    ids = tokenizer(["a red circle above a blue square"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    scaling = pipe.vae.config.scaling_factor

    def text(ids):
        return encoder(ids)[0].to(dtype)  # the text encoder stays in fp32, as in BootPipeline

    def unet_once(noise, states, w):
        return pipe.generator(noise, states, w)

    def vae(latents):
        return _to_uint8(pipe.vae.decode(latents / scaling).sample)

    teacher_eps = None
    if teacher is not None:
        from diffusers import UNet2DConditionModel

        t_unet = UNet2DConditionModel.from_pretrained(teacher / "unet", use_safetensors=True)
        t_unet = t_unet.eval().requires_grad_(False).to(device, dtype)
        teacher_eps = _guided(t_unet)
    return Stages("shipped", text, unet_once, vae, teacher_eps, ids, pipe.latent_shape, device, dtype)


def _guided(unet) -> Callable:
    """eps(latents, t, states, uncond, w) with classifier-free guidance: one UNet call on a batch of 2B."""
    import torch

    def eps(latents, t, states, uncond, w):
        out_u, out_c = unet(torch.cat([latents, latents]), t, torch.cat([uncond, states])).sample.chunk(2)
        return out_u + w.view(-1, 1, 1, 1).to(out_u.dtype) * (out_c - out_u)

    return eps


SD15 = {  # diffusers / transformers configs of Stable Diffusion 1.5's networks
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4),
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77),
    "latent": (4, 64, 64), "tokens": 77, "scaling": 0.18215,
}
SD15_TINY = {  # same networks, small: for smoke runs on a CPU
    "unet": dict(SD15["unet"], sample_size=8, layers_per_block=1, cross_attention_dim=32,
                 block_out_channels=(32, 32, 32, 32), attention_head_dim=4, norm_num_groups=8),
    "vae": dict(SD15["vae"], sample_size=32, layers_per_block=1, block_out_channels=(8, 8, 8, 8), norm_num_groups=8),
    "text": dict(SD15["text"], vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2),
    "latent": (4, 4, 4), "tokens": 77, "scaling": 0.18215,
}


def sd15_stages(config: dict, name: str, device, dtype, seed: int = 0) -> Stages:
    """Random-weight networks of the SD-1.5 architecture; the student is the UNet at t = 999."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config["unet"]).eval().requires_grad_(False).to(device, dtype)
    vae_model = AutoencoderKL(**config["vae"]).eval().requires_grad_(False).to(device, dtype)
    encoder = CLIPTextModel(CLIPTextConfig(**config["text"])).eval().requires_grad_(False).to(device, dtype)

    def text(ids):
        return encoder(input_ids=ids).last_hidden_state

    def unet_once(noise, states, w):
        t = torch.full((noise.shape[0],), 999, device=noise.device, dtype=torch.long)
        return noise - unet(noise, t, states).sample  # one evaluation; the parameterisation is elementwise

    def vae(latents):
        return _to_uint8(vae_model.decode(latents / config["scaling"]).sample)

    ids = torch.randint(1, config["text"]["vocab_size"], (1, config["tokens"]))
    return Stages(name, text, unet_once, vae, _guided(unet), ids, config["latent"], device, dtype)


# --------------------------------------------------------------------------------------------
# Running a stage: eager, torch.compile, or one CUDA graph per batch bucket
# --------------------------------------------------------------------------------------------
class Runner:
    """stage(*tensors) with the chosen graph mode; graphs are captured per input shape on first use."""

    def __init__(self, fn: Callable, mode: str):
        import torch

        self.fn, self.mode, self.graphs = fn, mode, {}
        if mode == "compile":
            self.fn = torch.compile(fn, mode="reduce-overhead", dynamic=False)

    def __call__(self, *args):
        import torch

        if self.mode != "manual":
            with torch.inference_mode():
                return self.fn(*args)
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, static_in, static_out = self.graphs[key]
        for s, a in zip(static_in, args):
            s.copy_(a)
        graph.replay()
        return static_out

    def _capture(self, args):
        import torch

        static_in = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph (cuDNN/cuBLAS choose their kernels)
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device, n: int, warmup: int) -> list[float]:
    """Seconds of each of n calls of fn(), the device synchronised around each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _stats(seconds: list[float], batch: int) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"batch": batch, "count": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "images_per_s": batch * len(ms) / float(np.sum(seconds))}


def measure(stages: Stages, batches: list[int], graphs: str, n: int, warmup: int, teacher_requests: int,
            teacher_steps: int = TEACHER_STEPS, log=print) -> dict:
    """Every number of one model (module docstring)."""
    import torch

    text, unet, vae = (Runner(f, graphs) for f in (stages.text, stages.unet_once, stages.vae))

    def request(x):
        images = vae(unet(x["noise"], text(x["ids"]), x["w"]))
        return images.cpu()  # the image on the host is part of the request

    out: dict = {"model": stages.name, "latent_shape": list(stages.latent_shape), "batches": []}
    for b in batches:
        x = stages.inputs(b)
        row = _stats(_timed(lambda x=x: request(x), stages.device, n, warmup), b)
        out["batches"].append(row)
        log(f"[in-process] {stages.name} batch {b}: p50 {row['p50_ms']:.2f} ms, {row['images_per_s']:.1f} images/s")
    x = stages.inputs(1)
    with torch.inference_mode():
        states = text(x["ids"]).clone()
        latents = unet(x["noise"], states, x["w"]).clone()
    out["split_batch1_ms"] = {
        "text_encoder": _stats(_timed(lambda: text(x["ids"]), stages.device, n, warmup), 1)["p50_ms"],
        "unet": _stats(_timed(lambda: unet(x["noise"], states, x["w"]), stages.device, n, warmup), 1)["p50_ms"],
        "vae_decoder": _stats(_timed(lambda: vae(latents), stages.device, n, warmup), 1)["p50_ms"]}
    if stages.teacher_eps is not None:
        out["teacher"] = _teacher(stages, graphs, teacher_requests, teacher_steps)
        out["teacher"]["speedup"] = out["teacher"]["p50_ms"] / out["batches"][0]["p50_ms"] if batches[0] == 1 \
            else None
        log(f"[in-process] {stages.name} teacher DDIM-{teacher_steps}: p50 {out['teacher']['p50_ms']:.1f} ms")
    return out


def _teacher(stages: Stages, graphs: str, requests: int, n_steps: int) -> dict:
    """DDIM with guidance at `n_steps` steps, batch 1, end to end (text encoder and VAE included)."""
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(n_steps)
    text, vae = Runner(stages.text, graphs), Runner(stages.vae, graphs)
    eps = Runner(stages.teacher_eps, graphs)
    x = stages.inputs(1)
    uncond_ids = torch.zeros_like(x["ids"])
    steps = [t.reshape(1).to(stages.device) for t in sched.timesteps]

    def sample():
        states, uncond = text(x["ids"]).clone(), text(uncond_ids).clone()
        latents = x["noise"]
        for t in steps:
            with torch.inference_mode():
                e = eps(latents, t, states, uncond, x["w"])
                latents = sched.step(e, t, latents).prev_sample
        return vae(latents).cpu()

    row = _stats(_timed(sample, stages.device, requests, 1), 1)
    return {**row, "steps": n_steps, "unet_evaluations": 2 * n_steps}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    hw, cfg = report["hardware"], report["config"]
    lines = [f"# boot in-process benchmark ({report['date']})", "",
             f"Device `{cfg['device']}` ({', '.join(hw['gpus']) or hw['cpu']}), {cfg['dtype']}, graphs: "
             f"{cfg['graphs']}; {cfg['requests']} timed calls per row after {cfg['warmup']} warm-up. "
             f"Load average at start {report['load_average']['start']}, at end {report['load_average']['end']}.", "",
             "| model | batch | p50 ms | p99 ms | images/s |", "|---|---|---|---|---|"]
    for m in report["models"]:
        for r in m["batches"]:
            lines.append(f"| {m['model']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['images_per_s']:.1f} |")
    lines += ["", "Split of a batch-1 request (each stage timed alone):", "",
              f"| model | text encoder ms | UNet ms | VAE decoder ms | teacher DDIM-{cfg['teacher_steps']} p50 ms "
              "| teacher / student |",
              "|---|---|---|---|---|---|"]
    for m in report["models"]:
        s, t = m["split_batch1_ms"], m.get("teacher")
        ratio = f"{t['speedup']:.1f}x" if t and t.get("speedup") else "–"
        lines.append(f"| {m['model']} | {s['text_encoder']:.2f} | {s['unet']:.2f} | {s['vae_decoder']:.2f} | "
                     f"{t['p50_ms']:.1f} | {ratio} |" if t else
                     f"| {m['model']} | {s['text_encoder']:.2f} | {s['unet']:.2f} | {s['vae_decoder']:.2f} | – | – |")
    lines += ["", "Anchors (published, other hardware):", ""] + [f"- {a}" for a in ANCHORS]
    lines += ["", "Reproduce: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in report["models"]:
        ax1.plot([r["batch"] for r in m["batches"]], [r["images_per_s"] for r in m["batches"]], "o-", label=m["model"])
    ax1.set(xscale="log", yscale="log", xlabel="batch", ylabel="images / s", title="Throughput")
    ax1.legend(fontsize=8)
    names = [m["model"] for m in report["models"]]
    bottom = np.zeros(len(names))
    for stage in ("text_encoder", "unet", "vae_decoder"):
        v = np.array([m["split_batch1_ms"][stage] for m in report["models"]])
        ax2.bar(names, v, bottom=bottom, label=stage)
        bottom += v
    ax2.set(ylabel="ms at batch 1", title="Where a request's time goes")
    ax2.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"boot in-process on {cfg['device']}, {cfg['dtype']}, graphs {cfg['graphs']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boot_serve.bench --in-process", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-process", action="store_true", required=True, help="this benchmark (no server)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights and activations (default fp16)")
    p.add_argument("--graphs", choices=("manual", "compile", "none"), default="manual",
                   help="CUDA graphs: captured by hand per batch bucket, torch.compile reduce-overhead, or eager")
    p.add_argument("--student", type=Path, default=None,
                   help="student folder (the shipped one: pretrained/shapes-boot)")
    p.add_argument("--teacher", type=Path, default=None, help="the student's teacher folder, for the ratio")
    p.add_argument("--sd15", action="store_true", help="also an SD-1.5-architecture student at 512x512, random weights")
    p.add_argument("--sd15-tiny", action="store_true", help="the same with small networks (smoke runs)")
    p.add_argument("--batches", type=number_list(int, 1, unique=True), default=[1, 4, 16, 64],
                   help="batch sizes (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=50, help="timed calls per row (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each row (default 5)")
    p.add_argument("--teacher-requests", type=int, default=5, help="timed teacher samples (default 5)")
    p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS,
                   help=f"teacher DDIM steps (default {TEACHER_STEPS}; with guidance, 2 UNet evaluations a step)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/in-process"), help="report folder")
    args = p.parse_args(argv)
    if args.graphs != "none" and not str(args.device).startswith("cuda"):
        p.error(f"--graphs {args.graphs} needs a CUDA device; use --graphs none on {args.device}")
    if not (args.student or args.sd15 or args.sd15_tiny):
        p.error("nothing to measure: give --student and/or --sd15 / --sd15-tiny")
    if min(args.requests, args.teacher_requests, args.teacher_steps) < 1 or args.warmup < 0:
        p.error("--requests, --teacher-requests and --teacher-steps must be >= 1, --warmup >= 0")
    return args


def run(args: argparse.Namespace, argv: list[str] | None = None, log=print) -> dict:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    dtype = getattr(torch, DTYPES[args.dtype])
    load_start = load_average()
    models = []
    if args.student is not None:
        stages = shipped_stages(args.student, args.teacher, device, dtype)
        models.append(measure(stages, args.batches, args.graphs, args.requests, args.warmup,
                              args.teacher_requests, args.teacher_steps, log))
    for flag, config, name in ((args.sd15, SD15, "sd15-512"), (args.sd15_tiny, SD15_TINY, "sd15-tiny")):
        if flag:
            models.append(measure(sd15_stages(config, name, device, dtype), args.batches, args.graphs,
                                  args.requests, args.warmup, args.teacher_requests, args.teacher_steps, log))
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python -m boot_serve.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "hardware": hardware(), "versions": versions(),
              "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "load_average": {"start": load_start, "end": load_average()}, "anchors": ANCHORS, "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.md").write_text(markdown(report))
    plot(report, args.out / "bench.png")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, argv)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "bench.md").read_text())
    return 0
