"""Soak: hold a Triton server at a fixed concurrency for minutes; errors, latency and memory per window.

    python -m boot_serve.soak --url 127.0.0.1:8000 --minutes 10 --concurrency 8 --out runs/soak
    python -m boot_serve.soak --url 127.0.0.1:8000 --pid $(pgrep -o tritonserver)   # + server memory

The load is bench's closed loop (boot_serve.bench.closed_loop): `--concurrency` threads, one
Client each, one single-image request at a time. The run is cut into `--windows` equal windows;
for each: requests, errors, p50/p90/p99 latency, images/s, and the resident memory (RSS, from
/proc, Linux) of the server process and all its descendants (Triton's Python-backend stubs run
as child processes) at the end of the window. Verdicts:
  - errors: none at all;
  - memory flat: RSS growth from the end of the first window (allocators and caches warmed) to
    the end of the run within --max-rss-growth (fraction);
  - latency stable: the last window's p50 within --max-p50-drift (fraction) of the first's.
Written to --out: soak.json, soak.md, soak.png (p50/p99 and RSS over time). Exit 1 when a
verdict fails, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from boot.cli import Parser
from boot_serve.bench.loadgen import BenchError, closed_loop
from boot_serve.bench.machine import hardware, load_average


# --------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited while we looked
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # field 4; the name in (...) may hold spaces
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and every descendant, MiB (VmRSS from /proc/<pid>/status)."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def soak(url: str, protocol: str, concurrency: int, seconds: float, windows: int, pid: int | None,
         prompts: list[str], guidance: float | None = None, warmup: int = 16, log=print) -> dict:
    from boot_serve.client import Client

    @contextmanager
    def client_generate():
        with Client(url, protocol, concurrency=1) as client:
            yield client.generate

    with Client(url, protocol) as probe:
        probe.check()
    seeds = list(range(len(prompts)))
    rows, t0 = [], time.perf_counter()
    for w in range(windows):
        series = closed_loop(client_generate, concurrency, prompts, seeds, guidance, n=10**9,
                             warmup=warmup if w == 0 else 0, max_seconds=seconds / windows)
        row = {"window": w, "end_s": round(time.perf_counter() - t0, 1), "errors": len(series.errors),
               "error_samples": series.errors[:3]}
        if series.latencies_s:
            s = series.summary()
            row.update({k: round(v, 2) for k, v in asdict(s).items() if k.endswith(("_ms", "_s"))},
                       requests=s.count)
        else:
            row.update(requests=0)
        if pid is not None:
            row["rss_mb"] = round(tree_rss_mb(pid), 1)
        rows.append(row)
        log(f"[soak] window {w + 1}/{windows}: {row['requests']} ok, {row['errors']} errors, "
            f"p50 {row.get('p50_ms', float('nan')):.1f} ms, p99 {row.get('p99_ms', float('nan')):.1f} ms"
            + (f", server RSS {row['rss_mb']:.0f} MiB" if pid is not None else ""))
    return {"url": url, "protocol": protocol, "concurrency": concurrency, "seconds": seconds, "windows": rows,
            "hardware": hardware(), "load_average_end": load_average()}


def verdicts(report: dict, max_rss_growth: float, max_p50_drift: float) -> dict:
    rows = report["windows"]
    first, last = rows[0], rows[-1]
    out = {"errors": {"total": sum(r["errors"] for r in rows), "ok": sum(r["errors"] for r in rows) == 0},
           "requests": sum(r["requests"] for r in rows)}
    if "p50_ms" in first and "p50_ms" in last:
        drift = last["p50_ms"] / first["p50_ms"] - 1
        out["latency"] = {"first_p50_ms": first["p50_ms"], "last_p50_ms": last["p50_ms"],
                          "drift": round(drift, 3), "ok": drift <= max_p50_drift}
    if "rss_mb" in first:
        growth = last["rss_mb"] / first["rss_mb"] - 1
        out["memory"] = {"after_first_window_mb": first["rss_mb"], "end_mb": last["rss_mb"],
                         "growth": round(growth, 3), "ok": growth <= max_rss_growth}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    v = report["verdicts"]
    lines = [f"# Soak: {report['seconds'] / 60:.1f} min at concurrency {report['concurrency']} "
             f"({report['protocol']})", "",
             f"Hardware: {report['hardware']['cpu']}, {report['hardware']['usable_cpus']} CPUs. "
             f"{v['requests']} requests, {v['errors']['total']} errors.", "",
             "| window end (s) | requests | errors | p50 ms | p90 ms | p99 ms | images/s | server RSS MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["windows"]:
        lines.append(f"| {r['end_s']} | {r['requests']} | {r['errors']} | {r.get('p50_ms', '-')} | "
                     f"{r.get('p90_ms', '-')} | {r.get('p99_ms', '-')} | {r.get('images_per_s', '-')} | "
                     f"{r.get('rss_mb', '-')} |")
    lines.append("")
    for key in ("latency", "memory"):
        if key in v:
            lines.append(f"- {key}: {json.dumps(v[key])}")
    lines.append(f"- verdict: {'PASS' if v['ok'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["windows"] if "p50_ms" in r]
    t = [r["end_s"] / 60 for r in rows]
    fig, ax1 = plt.subplots(figsize=(8, 4))
    ax1.plot(t, [r["p50_ms"] for r in rows], "o-", label="p50")
    ax1.plot(t, [r["p99_ms"] for r in rows], "^:", label="p99")
    ax1.set(xlabel="minutes", ylabel="latency (ms)", ylim=(0, None))
    ax1.grid(alpha=0.3)
    if rows and "rss_mb" in rows[0]:
        ax2 = ax1.twinx()
        ax2.plot(t, [r["rss_mb"] for r in rows], "s-", color="tab:red", label="server RSS")
        ax2.set(ylabel="server RSS (MiB)", ylim=(0, max(r["rss_mb"] for r in rows) * 1.2))
        ax2.legend(loc="upper right", fontsize=8)
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title(f"soak at concurrency {report['concurrency']}: {report['verdicts']['requests']} requests, "
                  f"{report['verdicts']['errors']['total']} errors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(markdown(report))
    plot(report, out / "soak.png")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parser() -> Parser:
    p = Parser(prog="python -m boot_serve.soak", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8000", help="server host:port")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton protocol")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    p.add_argument("--concurrency", type=int, default=8, help="client threads, one request in flight each")
    p.add_argument("--pid", type=int, default=None, help="tritonserver's pid, to follow its memory (local only)")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="report folder")
    x = p.operator_group("windows and verdicts (experts)")
    x.add_argument("--windows", type=int, default=10, help="statistics windows the run is cut into")
    x.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the student's)")
    x.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after window 1")
    x.add_argument("--max-p50-drift", type=float, default=0.5, help="allowed last/first window p50 drift")
    return p


def main(argv: list[str] | None = None) -> int:
    from boot_serve.prompts import example_prompts

    p = parser()
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.windows < 2 or args.concurrency < 1:
        p.error("--minutes must be > 0, --windows >= 2, --concurrency >= 1")
    if args.pid is not None and not Path(f"/proc/{args.pid}").is_dir():
        p.error(f"--pid {args.pid}: no such process here")
    try:
        report = soak(args.url, args.protocol, args.concurrency, args.minutes * 60, args.windows, args.pid,
                      example_prompts(64, 7 * 64), args.guidance)
    except (BenchError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["verdicts"] = verdicts(report, args.max_rss_growth, args.max_p50_drift)
    write(report, args.out)
    print(markdown(report))
    print(f"written to {args.out}/soak.{{json,md,png}}")
    return 0 if report["verdicts"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
