"""What the guards cost: the same server reached through its guards and directly, interleaved.

    python -m boot_serve.bench.guard --repository model_repository --out docs/bench/guard

One `python -m boot_serve.serve` process (supervised, guarded, as users run it; its own process, so
the guards never share an interpreter with the load generator), free ports. For
each concurrency level, --rounds rounds; each round sends --requests single-image requests
(closed loop, boot_serve.bench.loadgen) to each path in turn: HTTP through the guard, HTTP to
Triton's own port, and the same for gRPC, so that drift in the machine's load falls on every
path alike. Latencies are pooled over the rounds. Overhead = guarded p50 / direct p50 - 1.
Every path gets the same prompts, each already in the served model's text-state cache (a first
pass sends each once), so that no path pays the text encoder where another one does not.
Also the CPU time the serve process (the guards, on their threads) spends per measured request on
each path: unlike latency it hardly depends on what else the machine is doing. Writes report.json,
report.md and latency.png (p50 per path and level) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from boot_serve.bench.loadgen import BenchError, Series, closed_loop
from boot_serve.bench.machine import hardware, load_average, versions
from boot_serve.client import Client
from boot_serve.prompts import example_prompts

PATHS = ("http guarded", "http direct", "grpc guarded", "grpc direct")


def _generate(url: str, protocol: str):
    @contextmanager
    def make():
        with Client(url, protocol, concurrency=1) as client:
            yield client.generate
    return make


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (all its threads; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Served:
    """The endpoints `python -m boot_serve.serve` printed: guarded and Triton's own; `pid` its process."""

    def __init__(self, text: str, pid: int = 0):
        self.pid = pid
        found = {name: re.search(rf"{name}\s+(\S+)\s+\(guarded; Triton's own: (\S+)\)", text)
                 for name in ("HTTP", "gRPC")}
        if not all(found.values()):
            raise BenchError(f"boot_serve.serve did not print guarded endpoints:\n{text}")
        self.http_url, self.triton_http_url = found["HTTP"].groups()
        self.grpc_url, self.triton_grpc_url = found["gRPC"].groups()


@contextmanager
def serve(repository: str, timeout: float = 600.0):
    """`python -m boot_serve.serve` on free ports until the block ends (SIGTERM)."""
    cmd = [sys.executable, "-m", "boot_serve.serve", "--repository", str(repository), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    text, deadline = "", time.monotonic() + timeout
    try:
        for line in proc.stdout:
            text += line
            if "Ctrl-C stops it." in line or time.monotonic() > deadline:
                break
        yield Served(text, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(service: Served, levels: list[int], n: int, rounds: int, warmup: int, max_seconds: float) -> list[dict]:
    urls = {"http guarded": (service.http_url, "http"), "http direct": (service.triton_http_url, "http"),
            "grpc guarded": (service.grpc_url, "grpc"), "grpc direct": (service.triton_grpc_url, "grpc")}
    prompts = example_prompts(256)
    seeds = list(range(len(prompts)))
    with Client(service.triton_http_url, "http", concurrency=1) as client:  # every prompt in the text cache
        for prompt in dict.fromkeys(prompts):
            client.generate([prompt], [0])
    results = []
    for c in levels:
        pooled = {path: Series([], 0.0, []) for path in PATHS}
        cpu = {path: [0.0, 0] for path in PATHS}  # serve-process CPU seconds, requests
        for _ in range(rounds):
            for path in PATHS:
                start: list[float] = []
                s = closed_loop(_generate(*urls[path]), c, prompts, seeds, None, n, warmup, max_seconds,
                                between=lambda start=start: start.append(process_cpu_s(service.pid)))
                cpu[path][0] += process_cpu_s(service.pid) - start[0]
                cpu[path][1] += len(s.latencies_s) + len(s.errors)
                pooled[path] = Series(pooled[path].latencies_s + s.latencies_s, pooled[path].wall_s + s.wall_s,
                                      pooled[path].errors + s.errors)
        row = {"concurrency": c, **{path: asdict(pooled[path].summary()) for path in PATHS},
               "serve_cpu_ms_per_request": {path: 1e3 * used / max(k, 1) for path, (used, k) in cpu.items()}}
        for proto in ("http", "grpc"):
            guarded, direct = row[f"{proto} guarded"]["p50_ms"], row[f"{proto} direct"]["p50_ms"]
            row[f"{proto} p50 overhead"] = guarded / direct - 1
        results.append(row)
        print(f"c={c}: " + ", ".join(f"{p} p50 {row[p]['p50_ms']:.1f} ms" for p in PATHS)
              + f"; overhead http {row['http p50 overhead']:+.1%}, grpc {row['grpc p50 overhead']:+.1%}; serve-process "
              + "CPU per request " + ", ".join(f"{p} {v:.2f} ms" for p, v in row["serve_cpu_ms_per_request"].items()),
              flush=True)
    return results


def write(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    hw = report["hardware"]
    lines = [f"# What the guards cost ({hw['cpu']}, {hw['usable_cpus']} usable CPUs)", "",
             f"{report['requests']} requests per path and round, {report['rounds']} rounds interleaved, every "
             "prompt a text-cache hit on every path; "
             f"load average before {report['load_average_before']}, after {report['load_average_after']}.", "",
             "| concurrency | path | p50 ms | p90 ms | p99 ms | images/s | errors |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        for path in PATHS:
            s = row[path]
            lines.append(f"| {row['concurrency']} | {path} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | "
                         f"{s['p99_ms']:.1f} | {s['images_per_s']:.2f} | {s['errors']} |")
    lines += ["", "p50 overhead of the guard: " + "; ".join(
        f"c={r['concurrency']} HTTP {r['http p50 overhead']:+.1%}, gRPC {r['grpc p50 overhead']:+.1%}"
        for r in report["results"])]
    lines += ["", "CPU time of the serve process (the guards) per measured request: " + "; ".join(
        f"c={r['concurrency']} " + ", ".join(f"{p} {v:.2f} ms" for p, v in r["serve_cpu_ms_per_request"].items())
        for r in report["results"])]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.2
    for k, path in enumerate(PATHS):
        xs = [i + (k - 1.5) * width for i in range(len(report["results"]))]
        ax.bar(xs, [r[path]["p50_ms"] for r in report["results"]], width, label=path)
    ax.set_xticks(range(len(report["results"])), [f"concurrency {r['concurrency']}" for r in report["results"]])
    ax.set_ylabel("p50 latency, ms")
    ax.set_title(f"Guarded vs direct ({report['hardware']['cpu']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m boot_serve.bench.guard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="exported model repository")
    p.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=100, help="measured requests per path, level and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests before each block")
    p.add_argument("--max-seconds", type=float, default=300.0, help="cap on one block")
    p.add_argument("--out", type=Path, default=Path("runs/bench-guard"), help="report folder")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if min(levels) < 1 or args.requests < 1 or args.rounds < 1:
        p.error("--concurrency levels, --requests and --rounds must be >= 1")
    load_before = load_average()
    try:
        with serve(args.repository) as service:
            results = measure(service, levels, args.requests, args.rounds, args.warmup, args.max_seconds)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = {"hardware": hardware(), "versions": versions(), "repository": str(args.repository),
              "requests": args.requests, "rounds": args.rounds, "load_average_before": load_before,
              "load_average_after": load_average(), "results": results}
    write(report, args.out)
    print(f"wrote {args.out}/report.json, report.md, latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
