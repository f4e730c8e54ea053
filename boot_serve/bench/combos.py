"""Students and decoders side by side: the compute floor of each exported combination, stage by stage, and
each one's in-process speedup over the teacher, in one run on one machine.

    python -m boot_serve.bench.combos --combo full=runs/full --combo full+tiny=runs/full-tiny \\
        --combo compact=runs/compact --combo compact+tiny=runs/compact-tiny \\
        --teacher pretrained/shapes-teacher --accuracy runs/compare/compare.json --out docs/bench/combos

Each --combo NAME=REPOSITORY is a repository written by `python -m boot_serve.export` (with
`--decoder tiny` for a tiny decoder). What is measured (time.perf_counter, after a warm-up):
  1. ONNX Runtime floor: the repository's three graphs in this process with the server's session settings
     (bench.measure.floor_pipeline), batch 1, every request a prompt not sent before (no text-state cache
     exists in-process: each request pays the text encoder); per request the text encoder, the student and
     the decoder are timed on their own and end to end. The combinations run interleaved, --block requests
     of each in turn, so that a drift in the machine's load hits all alike.
  2. PyTorch eager, in-process: each combination's student (BootPipeline of the repository's source student,
     with the tiny decoder where the repository has one) against the teacher's DDIM at --teacher-steps, in
     rounds: a few calls of every student, then one teacher call; speedup = teacher p50 / student p50.
  3. with --sd15 (or --sd15-tiny for a smoke run): speed only, random weights of the SD-1.5 architecture at
     512x512 in PyTorch eager, batch 1, one call of each part in turn, --sd15-rounds rounds: the UNet full
     and compact by each boot.compact rule, the VAE decoder full and an AutoencoderTiny (TAESD layout).
With --accuracy (compare.json of `python -m distill.compare`, its generator names equal to the combination
names) the report adds each one's judged accuracy and draws latency against accuracy.
Written to --out: combos.json (raw latencies included), combos.md, combos.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from boot_serve.bench.loadgen import BenchError, Series
from boot_serve.bench.machine import hardware
from boot_serve.bench.measure import floor_pipeline, interleaved

STAGES = ("text_encoder", "boot_unet", "vae_decoder")
PROMPT_OFFSET, FIRST_SEED = 50_000, 7_000


class StagedFloor:
    """OnnxPipeline's request path with each graph timed: text states, one student evaluation, decode."""

    def __init__(self, repository: Path, threads: int = 0):
        self.pipe, self.settings = floor_pipeline(repository, threads)
        self.stages: dict[str, list[float]] = {s: [] for s in STAGES}

    def __call__(self, prompts, seeds, guidance_scale=None):
        pipe = self.pipe
        w = pipe.check_inputs(prompts, seeds, guidance_scale)
        t0 = time.perf_counter()
        states, embeds = pipe.encode_prompt_pooled(prompts)
        t1 = time.perf_counter()
        feeds = {"noise": pipe.noise(seeds), "text_states": states,
                 "guidance_scale": np.full((len(prompts),), w, dtype=np.float32)}
        if embeds is not None:
            feeds["text_embeds"] = embeds
        latents = pipe.sessions["boot_unet"].run(["latents"], feeds)[0]
        t2 = time.perf_counter()
        image = pipe.decode(latents)
        t3 = time.perf_counter()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2)):
            self.stages[stage].append(seconds)
        return image

    def clear(self) -> None:
        for times in self.stages.values():
            times.clear()


def torch_student(repository: Path):
    """BootPipeline of the repository's source student, its VAE the tiny decoder where the graph holds one."""
    from boot.decoders import load_tiny_decoder
    from boot.pipeline import BootPipeline

    manifest = json.loads((repository / "manifest.json").read_text())
    pipe = BootPipeline.from_pretrained(manifest["source_student"])
    if manifest.get("decoder", {}).get("kind") == "tiny":
        pipe.vae = load_tiny_decoder(manifest["decoder"]["folder"], pipe.vae.config)
    return pipe


def teacher_speedups(students: dict, teacher, prompts, seeds, guidance, rounds: int, per_round: int) -> dict:
    """Rounds of `per_round` calls of every student, then one teacher call; each student's p50 and the
    teacher's p50 over all rounds, and teacher p50 / student p50."""
    for gen in (*students.values(), teacher):  # warm-up, not counted
        gen([prompts[0]], [seeds[0]], guidance)
    series = {name: Series() for name in (*students, "teacher")}
    i = 1
    for _ in range(rounds):
        for name, gen in (*students.items(), ("teacher", teacher)):
            for _ in range(per_round if name != "teacher" else 1):
                t0 = time.perf_counter()
                gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
                series[name].latencies_s.append(time.perf_counter() - t0)
                series[name].wall_s += series[name].latencies_s[-1]
                i += 1
    teacher_p50 = series["teacher"].summary().p50_ms
    out = {name: {**vars(s.summary()), "speedup": teacher_p50 / s.summary().p50_ms} for name, s in series.items()
           if name != "teacher"}
    out["teacher"] = vars(series["teacher"].summary())
    return out


def sd15_parts(config: dict, rounds: int) -> dict:
    """p50 ms of each SD-1.5-architecture part at batch 1 (random weights; speed only), interleaved rounds."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    from boot.compact import RULES, compact_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config["unet"]).eval()
    unets = {"UNet": unet, **{f"UNet, compact {rule}": compact_unet(unet, rule).eval() for rule in RULES}}
    full = AutoencoderKL(**config["vae"]).eval()
    tiny = AutoencoderTiny(**config.get("tiny", {})).eval()
    c, h, w = config["latent"]
    noise, t = torch.randn(1, c, h, w), torch.tensor([999])
    states = torch.randn(1, config["tokens"], config["unet"]["cross_attention_dim"])
    parts = {**{name: (lambda u=u: u(noise, t, states).sample) for name, u in unets.items()},
             "VAE decoder": lambda: full.decode(noise / config["scaling"]).sample,
             "tiny decoder": lambda: tiny.decode(noise).sample}
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for fn in parts.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in parts.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    params = {**{name: sum(p.numel() for p in u.parameters()) for name, u in unets.items()},
              "VAE decoder": sum(p.numel() for p in full.decoder.parameters()),
              "tiny decoder": sum(p.numel() for p in tiny.decoder.parameters())}
    return {name: {"p50_ms": float(np.median(ts) * 1000), "parameters": params[name], "rounds": rounds}
            for name, ts in times.items()}


def accuracies(path: Path | None, names: list[str]) -> dict:
    """name -> {split: accuracy (%)} from a distill.compare report (fractions there), for the names it judged."""
    if path is None:
        return {}
    report = json.loads(path.read_text())
    found = {}
    for split, entry in report["splits"].items():
        for name, r in entry["generators"].items():
            if name in names:
                found.setdefault(name, {})[split] = {"accuracy": 100 * r["accuracy"], "single": 100 * r["single"],
                                                     "two": 100 * r["two"], "sign_test_p_vs_first": r["sign_test_p"],
                                                     "first": report["generators"][0], "captions": report["n"]}
    return found


def markdown(report: dict) -> str:
    rows = ["| combination | end to end p50 (p90) | text encoder | student | decoder | PyTorch speedup over "
            f"teacher-{report['teacher_steps']} | accuracy |", "|---|---|---|---|---|---|---|"]
    for name, r in report["combos"].items():
        st = r["stages_p50_ms"]
        acc = r.get("accuracy")
        acc_text = "–" if not acc else "; ".join(
            f"{split} {a['accuracy']:.1f}% (two objects {a['two']:.1f}%)" + (
                "" if a["first"] == name else f", p = {a['sign_test_p_vs_first']:.2g} vs {a['first']}")
            for split, a in acc.items())
        speed = r.get("torch")
        rows.append(f"| {name} | {r['floor']['p50_ms']:.2f} ms ({r['floor']['p90_ms']:.2f}) | "
                    f"{st['text_encoder']:.2f} ms | {st['boot_unet']:.2f} ms | {st['vae_decoder']:.2f} ms | "
                    + (f"{speed['speedup']:.1f}x ({speed['p50_ms']:.1f} ms) | " if speed else "– | ") + acc_text + " |")
    head = [f"# Students and decoders side by side ({report['machine']['description']})", "",
            f"ONNX Runtime in-process, batch 1, {report['requests']} requests each, interleaved in blocks of "
            f"{report['block']}, every prompt new; load average {report['load_start']} at start, "
            f"{report['load_end']} at end.", ""]
    if "sd15" in report:
        rows += ["", f"SD-1.5 architecture at 512x512, random weights, PyTorch eager, batch 1 "
                 f"({next(iter(report['sd15'].values()))['rounds']} rounds, p50):", "",
                 "| part | parameters | p50 |", "|---|---|---|"]
        rows += [f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['p50_ms']:.0f} ms |"
                 for name, r in report["sd15"].items()]
    return "\n".join(head + rows) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, r in report["combos"].items():
        acc = next(iter(r.get("accuracy", {}).values()), None)
        if acc is None:
            continue
        ax.scatter(r["floor"]["p50_ms"], acc["accuracy"], s=40)
        ax.annotate(name, (r["floor"]["p50_ms"], acc["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("ONNX Runtime p50 per image, batch 1 (ms)")
    ax.set_ylabel("judged accuracy (%)")
    ax.set_title(f"latency vs accuracy, {report['machine']['description']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boot_serve.bench.combos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--combo", action="append", required=True, metavar="NAME=REPOSITORY",
                   help="a name and an exported repository; give two or more")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder for the PyTorch speedup (default: none)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM steps (default 50)")
    p.add_argument("--teacher-rounds", type=int, default=12, help="rounds of the PyTorch comparison (default 12)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per combination (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up requests per combination (default 10)")
    p.add_argument("--block", type=int, default=10, help="requests of each combination in turn (default 10)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: the server's)")
    p.add_argument("--accuracy", type=Path, default=None, help="compare.json of python -m distill.compare")
    p.add_argument("--sd15", action="store_true", help="also time SD-1.5-architecture parts at 512x512")
    p.add_argument("--sd15-tiny", action="store_true", help="the same with small networks (smoke runs)")
    p.add_argument("--sd15-rounds", type=int, default=5, help="rounds of the SD-1.5 parts (default 5)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    args = p.parse_args(argv)
    combos = {}
    for item in args.combo:
        name, sep, repo = item.partition("=")
        if not sep or not name or not (Path(repo) / "manifest.json").is_file():
            p.error(f"--combo {item}: give NAME=REPOSITORY, a repository written by python -m boot_serve.export")
        if name in combos:
            p.error(f"--combo {name} given twice")
        combos[name] = Path(repo)
    if len(combos) < 2:
        p.error("give two or more --combo")
    args.combos = combos
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    from boot_serve.prompts import distinct_example_prompts

    n = args.warmup + args.requests
    prompts = distinct_example_prompts(n + args.teacher_rounds * 4 * (len(args.combos) + 1) + 1, PROMPT_OFFSET)
    seeds = [FIRST_SEED + i for i in range(len(prompts))]
    guidance = None
    load_start = round(os.getloadavg()[0], 2)
    floors = {name: StagedFloor(repo, args.threads) for name, repo in args.combos.items()}
    log(f"[combos] ONNX Runtime floor: {len(floors)} combinations x {args.requests} requests, blocks of {args.block}")
    series = interleaved(floors, prompts, seeds, guidance, args.requests, args.warmup, args.block, 3600.0,
                         measured_offset=args.warmup, between=lambda: [f.clear() for f in floors.values()])
    report = {"machine": machine(), "requests": args.requests, "block": args.block, "load_start": load_start,
              "teacher_steps": args.teacher_steps, "combos": {}}
    acc = accuracies(args.accuracy, list(args.combos))
    for name, floor in floors.items():
        report["combos"][name] = {
            "repository": str(args.combos[name]), "decoder": floor.pipe.manifest.get("decoder", {"kind": "full"}),
            "floor": vars(series[name].summary()),
            "stages_p50_ms": {s: float(np.median(t) * 1000) for s, t in floor.stages.items()},
            "latencies_ms": [round(x * 1000, 3) for x in series[name].latencies_s],
            **({"accuracy": acc[name]} if name in acc else {})}
        log(f"[combos] {name}: p50 {report['combos'][name]['floor']['p50_ms']:.2f} ms")
    if args.teacher is not None:
        from boot.samplers import TeacherSampler

        students = {name: torch_student(repo) for name, repo in args.combos.items()}
        teacher = TeacherSampler(args.teacher, args.teacher_steps, guidance)
        log(f"[combos] PyTorch: {args.teacher_rounds} rounds of every student and the teacher")
        speed = teacher_speedups(students, teacher, prompts[n:], seeds[n:], guidance, args.teacher_rounds, 4)
        report["teacher_torch"] = speed.pop("teacher")
        for name, s in speed.items():
            report["combos"][name]["torch"] = s
    if args.sd15 or args.sd15_tiny:
        from boot_serve.bench.inprocess import SD15, SD15_TINY

        log("[combos] SD-1.5 architecture parts" + (" (small networks)" if args.sd15_tiny else " at 512x512"))
        config = SD15_TINY if args.sd15_tiny else SD15
        if args.sd15_tiny:
            small = (8, 8, 8, 8)
            config = {**config, "tiny": dict(decoder_block_out_channels=small, encoder_block_out_channels=small)}
        report["sd15"] = sd15_parts(config, args.sd15_rounds)
    report["load_end"] = round(os.getloadavg()[0], 2)
    return report


def machine() -> dict:
    """bench.machine.hardware() and a one-line description of it for the report's title."""
    hw = hardware()
    where = ", ".join(hw["gpus"]) if hw["gpus"] else "no GPU"
    return {**hw, "description": f"{hw['logical_cpus']}-core {hw['cpu'].split(' @')[0]}, {where}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as err:
        print(f"error: {err}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "combos.json").write_text(json.dumps(report, indent=1))
    (args.out / "combos.md").write_text(markdown(report))
    plot(report, args.out / "combos.png")
    print(markdown(report))
    print(f"report written to {args.out}/combos.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
