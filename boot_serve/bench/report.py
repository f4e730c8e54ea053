"""The report: headline rows against the goals, the variants' ranking, Markdown and the PNG plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

GOALS = {"speedup_vs_teacher": 40.0, "serving_overhead_c1": 0.10, "throughput_ratio": 1.5}


def headlines(servers: list[dict], ab: dict | None, student: dict | None, teacher: dict | None,
              teacher_steps: int, round_ratios: Sequence[float] = ()) -> list[dict]:
    """The headline rows: the student/teacher speedup (with its spread over the interleaved rounds),
    then per served variant the overhead at concurrency 1, throughput 8 vs 1, p99 at 8."""
    floor = ab["floor"] if ab else None
    rows: list[dict] = []
    if teacher is not None and (student is not None or floor is not None):
        same = student is not None
        base = student if same else floor
        v = teacher["p50_ms"] / base["p50_ms"]
        row = {"metric": "speedup_vs_teacher", "variant": None, "value": v,
               "goal": f">= {GOALS['speedup_vs_teacher']:g}x", "met": v >= GOALS["speedup_vs_teacher"],
               "basis": (f"p50 teacher DDIM-{teacher_steps} / p50 student 1-step, both PyTorch eager in-process, "
                         "batch 1, interleaved" if same else
                         f"p50 teacher DDIM-{teacher_steps} (PyTorch) / p50 student 1-step (ONNX Runtime): "
                         "different runtimes, no student folder to run in PyTorch")}
        if len(round_ratios):
            q = np.percentile(np.asarray(round_ratios, dtype=np.float64), [0, 25, 50, 75, 100])
            row["spread"] = {"rounds": len(round_ratios), **dict(zip(("min", "q25", "median", "q75", "max"),
                                                                     (float(x) for x in q)))}
        rows.append(row)
    for server in servers:
        rows += _variant_headlines(server, ab, teacher, teacher_steps)
    return rows


def _variant_headlines(server: dict, ab: dict | None, teacher: dict | None, teacher_steps: int) -> list[dict]:
    name, by_c = server["variant"], {r["concurrency"]: r for r in server["served"]}
    rows = []
    if ab is not None and name in ab["served"]:
        v = ab["served"][name]["p50_ms"] / ab["floor"]["p50_ms"] - 1
        rows.append({"metric": "serving_overhead_c1", "variant": name, "value": v,
                     "goal": f"<= {100 * GOALS['serving_overhead_c1']:g}%", "met": v <= GOALS["serving_overhead_c1"],
                     "basis": "p50 served at concurrency 1 / p50 ONNX Runtime in-process (text encoder + student + "
                              "VAE decoder) - 1, measured interleaved"})
    if len(by_c) >= 2:
        hi, lo = (8, 1) if {1, 8} <= set(by_c) else (max(by_c), min(by_c))
        v = by_c[hi]["images_per_s"] / by_c[lo]["images_per_s"]
        rows.append({"metric": "throughput_ratio", "variant": name, "value": v,
                     "goal": f">= {GOALS['throughput_ratio']:g}x (8 vs 1)",
                     "met": v >= GOALS["throughput_ratio"] if (hi, lo) == (8, 1) else None,
                     "basis": f"images/s at concurrency {hi} / images/s at concurrency {lo}"})
    top = max(by_c)
    rows.append({"metric": f"p99_c{top}", "variant": name, "value": by_c[top]["p99_ms"], "goal": None, "met": None,
                 "basis": f"p99 latency at concurrency {top}, ms"})
    if teacher is not None and 1 in by_c:
        rows.append({"metric": "served_speedup_vs_teacher", "variant": name,
                     "value": teacher["p50_ms"] / by_c[1]["p50_ms"], "goal": None, "met": None,
                     "basis": f"p50 teacher DDIM-{teacher_steps} (PyTorch in-process) / p50 served student at "
                              "concurrency 1"})
    return rows


def headline(report: dict, metric: str, variant: str | None = None) -> dict | None:
    """The headline row of `metric` (for `variant`), or None."""
    return next((h for h in report["headlines"] if h["metric"] == metric and h["variant"] == variant), None)


def ranking(report: dict) -> list[str]:
    """Served variants, best first: most goals met, then the lower overhead at concurrency 1."""
    def key(variant):
        rows = [h for h in report["headlines"] if h["variant"] == variant]
        overhead = next((h["value"] for h in rows if h["metric"] == "serving_overhead_c1"), float("inf"))
        return (-sum(h["met"] is True for h in rows), overhead)

    return sorted((s["variant"] for s in report["servers"]), key=key)


def _fmt_headline(h: dict) -> str:
    m = h["metric"]
    value = (f"{100 * h['value']:+.1f}%" if m == "serving_overhead_c1" else
             f"{h['value']:.1f} ms" if m.startswith("p99_") else f"{h['value']:.2f}x")
    if "spread" in h:
        sp = h["spread"]
        value += (f" (per-round ratios over {sp['rounds']} rounds: min {sp['min']:.1f}x, quartiles "
                  f"{sp['q25']:.1f} / {sp['median']:.1f} / {sp['q75']:.1f}x, max {sp['max']:.1f}x)")
    met = {True: "yes", False: "**no**", None: "n/a"}[h.get("met")]
    return f"| {m} | {h['variant'] or '–'} | {value} | {h.get('goal') or '–'} | {met} | {h['basis']} |"


def _md_header(report: dict) -> list[str]:
    hw, cfg = report["hardware"], report["config"]
    servers = "; ".join(f"`{s['variant']}` at {cfg['protocol']}://{s['url']}" for s in report["servers"])
    lines = [f"# boot benchmark ({report['date']})", "",
             f"Server: Triton {report['server'].get('version', '?')}, {servers}; repository `{cfg['repository']}` "
             f"({cfg['precision']}, images {cfg['image_shape']}); guidance {cfg['guidance_scale']}; {cfg['requests']} "
             f"requests per level (at most {cfg['max_seconds']:g} s), {cfg['warmup']} warm-up.", "",
             f"Hardware: {hw['cpu']}, {hw['usable_cpus']} usable of {hw['logical_cpus']} logical CPUs, "
             f"{hw['memory_gib']} GiB; GPU: {', '.join(hw['gpus']) or 'none'}. "
             f"Load average at start {report['load_average']['start']}, at end {report['load_average']['end']}.", ""]
    if report.get("note"):
        lines += [f"Note: {report['note']}", ""]
    lines += [f"> **Warning:** {w}" for w in report.get("warnings", [])]
    lines += ["", "## Headline", "", "| metric | server variant | value | goal | met | what is compared |",
              "|---|---|---|---|---|---|"]
    lines += [_fmt_headline(h) for h in report["headlines"]] + [""]
    if len(report["servers"]) > 1:
        lines += [f"Variants, best first (most goals met, then lower overhead at concurrency 1): "
                  f"{', '.join(report['ranking'])}.", ""]
    return lines


def _md_served(report: dict) -> list[str]:
    lines = ["## Served (Triton, closed loop, one image per request)", "",
             "| variant | concurrency | requests | errors | p50 ms | p90 ms | p99 ms | mean ms | images/s | "
             "text-cache hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for server in report["servers"]:
        for r in server["served"]:
            lines.append(f"| {server['variant']} | {r['concurrency']} | {r['count']} | {r['errors']} | "
                         f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | "
                         f"{r['images_per_s']:.2f} | {_hit_rate(r.get('text_cache'))} |")
    mode = report["config"].get("prompt_mode", "cycle")
    lines += ["", "Text-cache hit rate: the server's text-state cache (boot_text_cache_hits / (hits + misses) on its "
              "metrics port, over the measured requests; a hit skips the text encoder). Prompts: "
              + ("`unique`, no prompt sent twice to a server: every request runs the text encoder."
                 if mode == "unique" else
                 "`cycle`, the same list in every level: after its first pass every prompt is a hit.")
              + " The compute floor runs the text encoder for every request, so served requests that hit can be "
              "faster than the floor: `--prompts unique` compares like with like."]
    lines += ["", "### Inside the server (Triton statistics over each level, mean per request)", "",
              "| variant | concurrency | model | requests | mean batch | queue ms | compute ms | total ms |",
              "|---|---|---|---|---|---|---|---|"]
    for server in report["servers"]:
        for r in server["served"]:
            for model, st in r["server"].items():
                lines.append(f"| {server['variant']} | {r['concurrency']} | {model} | {st['requests']} | "
                             f"{st['mean_batch']:.2f} | {st['queue_ms']:.2f} | {st['compute_ms']:.2f} | "
                             f"{st['total_ms']:.2f} |")
    lines += ["", "`boot_txt2img` is what the client calls: the ensemble (its total is the server-side time of a "
              "whole request) or, in cpu-onehop, the one model that does everything. Queue: waiting for the "
              "dynamic batcher (up to its max_queue_delay) or a free instance; the ensemble's models run one after "
              "the other.", ""]
    ab = report["overhead_ab"]
    lines += [f"### Serving overhead at concurrency 1 (interleaved in blocks of {ab['block']}: floor, "
              + ", ".join(ab["served"]) + ", floor, ...)", "",
              "| run | requests | p50 ms | p90 ms | p99 ms | mean ms | text-cache hit rate |",
              "|---|---|---|---|---|---|---|"]
    runs = [("compute floor, ONNX Runtime in-process", ab["floor"])]
    runs += [(f"served `{name}`, concurrency 1", r) for name, r in ab["served"].items()]
    for label, r in runs:
        lines.append(f"| {label} | {r['count']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['mean_ms']:.1f} | {_hit_rate(r.get('text_cache')) if r is not ab['floor'] else '–'} |")
    return lines + [""]


def _hit_rate(text_cache: dict | None) -> str:
    if not text_cache:
        return "not reported"
    n = text_cache["hits"] + text_cache["misses"]
    return f"{text_cache['hit_rate']:.2f} ({text_cache['hits']}/{n})" if n else "no lookups"


def _md_pipelines(report: dict) -> list[str]:
    lines = ["## In-process pipelines (batch 1, one call at a time)", "",
             "| pipeline | runtime | network evaluations | requests | p50 ms | p90 ms | p99 ms | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["pipelines"]:
        st = row["summary"]
        lines.append(f"| {row['name']} | {row['runtime']} | {row['nfe']} | {st['count']} | {st['p50_ms']:.1f} | "
                     f"{st['p90_ms']:.1f} | {st['p99_ms']:.1f} | {st['images_per_s']:.2f} |")
    lines += ["", "Each pipeline runs end to end: prompt -> text encoder -> latents -> VAE decoder -> uint8 "
              "image. The teacher's network evaluations count both halves of classifier-free guidance."]
    if report.get("teacher_rounds"):
        tr = report["teacher_rounds"]
        lines += [f"Student (PyTorch) and teacher were timed interleaved: {len(tr['ratios'])} rounds of "
                  f"{min(tr['student_calls'])}-{max(tr['student_calls'])} student calls and one teacher call; "
                  "per-round ratios (teacher / median student of the round): "
                  f"{', '.join(f'{x:.1f}' for x in tr['ratios'])}."]
    return lines + [""]


def _md_environment(report: dict) -> list[str]:
    th = report["threads"]
    lines = ["## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["versions"].items()]
    lines += ["", "## Runtime settings", "",
              f"- PyTorch in-process: {th['torch_in_process']} intra-op threads",
              "- ONNX Runtime, compute floor (threads 0 = one per physical core): "
              + "; ".join(f"{m}: {_settings_text(v)}" for m, v in th["onnxruntime_floor"].items()),
              "- ONNX Runtime in the server: " + "; ".join(f"{m}: {_settings_text(v) or 'backend default'}"
                                                          for m, v in th["server_onnxruntime"].items()),
              f"- load generator: {th['client_threads']}", "",
              "Reproduce: `" + report["command"] + "`", ""]
    return lines


def markdown(report: dict) -> str:
    return "\n".join(_md_header(report) + _md_served(report) + _md_pipelines(report) + _md_environment(report))


def _settings_text(v: dict) -> str:
    parts = []
    if "intra_op_num_threads" in v:
        parts.append(f"threads {v['intra_op_num_threads']}")
    if "allow_spinning" in v:
        parts.append(f"spinning {v['allow_spinning']}")
    if v.get("providers"):
        parts.append("/".join(v["providers"]))
    return ", ".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    floor = next((row["summary"] for row in report["pipelines"] if row["key"] == "floor"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels: set[int] = set()
    for k, server in enumerate(report["servers"]):
        served, color = server["served"], f"C{k}"
        c = [r["concurrency"] for r in served]
        levels |= set(c)
        for key, style in (("p50_ms", "o-"), ("p99_ms", "^:")):
            ax1.plot(c, [r[key] for r in served], style, color=color,
                     label=f"{server['variant']} {key.replace('_ms', '')}")
        ax2.plot(c, [r["images_per_s"] for r in served], "o-", color=color, label=server["variant"])
    if floor:
        ax1.axhline(floor["p50_ms"], color="gray", lw=1, ls="-.", label="compute floor p50 (ORT, no server)")
        ax2.axhline(floor["images_per_s"], color="gray", lw=1, ls="-.", label="compute floor, batch 1")
    ax1.set(xlabel="concurrent requests", ylabel="latency per request (ms)", title="Latency")
    ax2.set(xlabel="concurrent requests", ylabel="images / s", title="Throughput")
    ticks = sorted(levels)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([str(x) for x in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    hw = report["hardware"]
    fig.suptitle(f"boot_txt2img on Triton ({report['config']['protocol']}), {hw['cpu']}, "
                 f"{hw['usable_cpus']} CPUs{', ' + hw['gpus'][0] if hw['gpus'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

