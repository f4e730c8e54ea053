"""Benchmark: the served student over a concurrency sweep, its compute floor, and the teacher.

    python -m boot_serve.bench --variants cpu-onehop,cpu-ensemble --repository model_repository \\
        --teacher pretrained/shapes-teacher --teacher-steps 50 --out docs/bench      # starts its own servers
    python -m boot_serve.bench --url 127.0.0.1:8000 --repository model_repository   # a server already running
    python -m boot_serve.bench --url 127.0.0.1:8001 --protocol grpc --concurrency 1,4,16 --requests 200
    python -m boot_serve.bench --in-process --device cuda ...    # no server: boot_serve.bench.inprocess

--variants: one tritonserver per repository variant (boot_serve.triton_repo), each on a copy of
--repository that links its graphs and has that variant's configs, all up for the whole run, so that
the variants are measured side by side under the same load: each sweep in turn, and the floor and
every server interleaved at concurrency 1. --url: the one server there (its variant read from
--repository's configs).

What is measured (wall times with time.perf_counter, always after a warm-up that is not counted):
  1. served: for each concurrency level c, c client threads (one boot_serve.client.Client each)
     send single-image requests (one prompt, one seed) to `boot_txt2img`, each thread waiting
     for its answer before sending the next (closed loop), until --requests requests have
     completed or --max-seconds have passed. Before the level, --warmup requests at the same
     concurrency. Latency = one request as the client sees it (serialisation, network, Triton's
     queues, every model of the ensemble). Throughput = completed images / wall time of the level.
     Triton's own statistics, the difference over the measured part of the level, split each
     model's time into queue (waiting for the dynamic batcher / a free instance) and compute.
  2. compute floor: the same requests through OnnxPipeline in this process: the text encoder,
     student and VAE-decoder graphs of --repository in ONNX Runtime with the server's session
     settings, batch 1, no server. This is what a request costs on the serving runtime with
     nothing around it. The floor is measured interleaved with served requests at concurrency 1
     (blocks of --ab-block requests, floor then server, repeated), so that a drift in the
     machine's load hits both alike; serving overhead = served p50 / floor p50 - 1 of that run.
  3. student vs teacher on one runtime (PyTorch eager, in this process, batch 1, one image per
     call, both end to end: prompt -> text encoder -> latents -> VAE decoder -> uint8 image):
     the teacher's DDIM at --teacher-steps k (TeacherSampler, with classifier-free guidance
     that is 2k UNet evaluations) against the student's one evaluation (BootPipeline of --student,
     or of the student the repository was exported from), interleaved: --teacher-requests rounds of
     a few student calls and one teacher call, so that both see the same machine. speedup = teacher
     p50 / student p50; its spread = the quartiles and extremes of the per-round ratios (teacher call /
     median student call of its round).
Written to --out: bench.json (everything, raw latencies included), bench.md, bench.png.

The server, this client and the in-process runs share the machine: on a small CPU the client's
threads take cycles from the server, and another busy process skews everything; the load
average at start and end is recorded so a reader can tell.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from boot_serve.triton_repo import MODELS as SERVER_MODELS

GOALS = {"speedup_vs_teacher": 40.0, "serving_overhead_c1": 0.10, "throughput_ratio": 1.5}
PROMPT_OFFSET = 0
FIRST_SEED = 1_000_000


class BenchError(RuntimeError):
    """The benchmark could not run (no server, no repository, every request failed)."""


# --------------------------------------------------------------------------------------------
# Statistics of a series of latencies
# --------------------------------------------------------------------------------------------
@dataclass
class Summary:
    count: int
    errors: int
    wall_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    images_per_s: float

    @classmethod
    def of(cls, latencies_s: Sequence[float], wall_s: float, errors: int = 0, images_per_request: int = 1
           ) -> Summary:
        """Percentiles by linear interpolation (numpy's default); images/s = images / wall time."""
        if not len(latencies_s):
            raise BenchError("no request succeeded: nothing to summarise")
        ms = np.asarray(latencies_s, dtype=np.float64) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(count=len(ms), errors=errors, wall_s=wall_s, p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99), mean_ms=float(ms.mean()), min_ms=float(ms.min()), max_ms=float(ms.max()),
                   images_per_s=len(ms) * images_per_request / wall_s if wall_s > 0 else float("nan"))


@dataclass
class Series:
    """Raw outcome of one timed run: per-request latencies (seconds) and the level's wall time."""

    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> Summary:
        return Summary.of(self.latencies_s, self.wall_s, len(self.errors))


Generate = Callable[[list[str], list[int], float | None], object]


class _Phase:
    """A shared budget of requests: `take` hands out request indices until `n` have been
    handed out or the deadline has passed."""

    def __init__(self, n: int, max_seconds: float):
        self.n, self.max_seconds = n, max_seconds
        self.next, self.deadline = 0, float("inf")
        self.lock = threading.Lock()

    def start(self) -> float:
        now = time.perf_counter()
        self.deadline = now + self.max_seconds
        return now

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.n or time.perf_counter() > self.deadline:
                return None
            self.next += 1
            return self.next - 1


def closed_loop(make_generator: Callable[[], ContextManager[Generate]], concurrency: int, prompts: Sequence[str],
                seeds: Sequence[int], guidance: float | None, n: int, warmup: int, max_seconds: float,
                between: Callable[[], None] | None = None) -> Series:
    """`concurrency` threads, each with its own generator from `with make_generator() as gen`
    (entered in the thread that uses it: tritonclient's HTTP client is bound to its thread), each sending one
    single-image request at a time. First `warmup` requests (not recorded), then `between()` in
    the calling thread while every worker waits (statistics snapshot), then `n` measured
    requests. Each phase stops handing out requests after `max_seconds`; requests in flight
    finish. Request i uses prompts[i % len], seeds[i % len]."""
    phases = [_Phase(warmup, max_seconds), _Phase(n, max_seconds)]
    gates = [threading.Barrier(concurrency + 1) for _ in range(3)]  # ready, warmed up, measure
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[list[str]] = [[] for _ in range(concurrency)]
    setup_errors: list[str] = []

    def send(gen: Generate, phase: _Phase, lat: list[float] | None, errs: list[str]) -> None:
        while (i := phase.take()) is not None:
            j = i % len(prompts)
            t0 = time.perf_counter()
            try:
                gen([prompts[j]], [seeds[j]], guidance)
            except Exception as err:  # noqa: BLE001 - counted and reported, the run goes on
                errs.append(f"{type(err).__name__}: {err}")
                continue
            if lat is not None:
                lat.append(time.perf_counter() - t0)

    def worker(k: int) -> None:
        try:
            with make_generator() as gen:
                gates[0].wait()
                send(gen, phases[0], None, [])
                gates[1].wait()
                gates[2].wait()
                send(gen, phases[1], latencies[k], errors[k])
        except threading.BrokenBarrierError:
            pass
        except Exception as err:  # noqa: BLE001 - making the generator failed; reported by the caller
            setup_errors.append(f"{type(err).__name__}: {err}")
            gates[0].abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    try:
        gates[0].wait()
        phases[0].start()
        gates[1].wait()
        if between is not None:
            between()
        t_start = phases[1].start()
        gates[2].wait()
    except threading.BrokenBarrierError:
        for g in gates:
            g.abort()
        for t in threads:
            t.join()
        raise BenchError(f"could not start the load: {setup_errors[:1] or 'a worker failed'}") from None
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    return Series([x for lat in latencies for x in lat], wall, [e for errs in errors for e in errs])


# --------------------------------------------------------------------------------------------
# Triton statistics
# --------------------------------------------------------------------------------------------
COUNTERS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def model_counters(stats: dict) -> dict[str, int]:
    """Cumulative counters of one model from Triton's statistics JSON (HTTP or gRPC form: gRPC
    writes int64 as strings and leaves zeros out)."""
    entry = stats["model_stats"][0]
    inf = entry.get("inference_stats", {})
    out = {"inference_count": int(entry.get("inference_count", 0)),
           "execution_count": int(entry.get("execution_count", 0))}
    for name in COUNTERS:
        out[f"{name}_count"] = int(inf.get(name, {}).get("count", 0))
        out[f"{name}_ns"] = int(inf.get(name, {}).get("ns", 0))
    return out


def snapshot(client, models: Sequence[str]) -> dict[str, dict[str, int]]:
    snap = {}
    for model in models:
        try:
            snap[model] = model_counters(client.statistics(model))
        except Exception:  # noqa: BLE001 - a model this server does not have: left out
            continue
    return snap


def settled_snapshot(client, before: dict[str, dict[str, int]], expected: int, timeout: float = 5.0
                     ) -> dict[str, dict[str, int]]:
    """A snapshot once the ensemble has counted all `expected` requests: Triton updates its
    statistics after it has sent the response, so a snapshot taken right after the last answer
    can miss that request."""
    from boot_serve.triton_repo import ENSEMBLE

    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(client, SERVER_MODELS)
        if ENSEMBLE not in snap or ENSEMBLE not in before:
            return snap
        done = sum(snap[ENSEMBLE][k] - before[ENSEMBLE][k] for k in ("success_count", "fail_count"))
        if done >= expected or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def _per_request_ms(n: int) -> Callable[[int], float]:
    return (lambda ns: ns / n / 1e6) if n else (lambda ns: float("nan"))


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict]:
    """Per model over an interval: requests, executions, mean batch, mean ms per request of
    queue / compute (input + infer + output) / total (success)."""
    out = {}
    for model in after:
        if model not in before:
            continue
        d = {k: after[model][k] - before[model][k] for k in after[model]}
        n = d["success_count"]
        per = _per_request_ms(n)
        compute = d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]
        out[model] = {"requests": n, "failed": d["fail_count"], "executions": d["execution_count"],
                      "inferences": d["inference_count"],
                      "mean_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else
                      float("nan"),
                      "queue_ms": per(d["queue_ns"]), "compute_ms": per(compute),
                      "compute_infer_ms": per(d["compute_infer_ns"]), "total_ms": per(d["success_ns"])}
    return out


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------
def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            gpus = [line.strip() for line in q.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "memory_gib": mem,
            "gpus": gpus, "platform": platform.platform(), "benchmark_process_nice": os.nice(0)}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "onnxruntime-gpu", "onnxruntime", "tritonclient", "nvidia-pytriton", "torch", "diffusers",
                 "transformers", "boot"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def server_metadata(url: str, protocol: str) -> dict:
    """Triton's name, version and extensions."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as lib

            return lib.InferenceServerClient(url).get_server_metadata(as_json=True)
        import tritonclient.http as lib

        return lib.InferenceServerClient(url).get_server_metadata()
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        return {"error": str(err)}


# --------------------------------------------------------------------------------------------
# The three measurements
# --------------------------------------------------------------------------------------------
def bench_server(url: str, protocol: str, levels: Sequence[int], prompts, seeds, guidance, n: int, warmup: int,
                 max_seconds: float, log=print) -> list[dict]:
    from boot_serve.client import Client

    @contextmanager
    def client_generate():
        with Client(url, protocol, concurrency=1) as client:
            yield client.generate

    with Client(url, protocol) as probe:
        probe.check()  # ServerUnavailableError with what to run, before any thread starts
        results = []
        for c in levels:
            snaps: list[dict] = []
            series = closed_loop(client_generate, c, prompts, seeds, guidance, n, warmup, max_seconds,
                                 between=lambda snaps=snaps: snaps.append(snapshot(probe, SERVER_MODELS)))
            after = settled_snapshot(probe, snaps[0], len(series.latencies_s) + len(series.errors))
            if not series.latencies_s:
                raise BenchError(f"concurrency {c}: every request failed; first error: {series.errors[:1]}")
            s = series.summary()
            log(f"[bench] served c={c}: {s.count} ok, {s.errors} failed, p50 {s.p50_ms:.1f} ms, "
                f"p99 {s.p99_ms:.1f} ms, {s.images_per_s:.2f} images/s")
            results.append({"concurrency": c, **asdict(s), "error_samples": series.errors[:5],
                            "server": stats_delta(snaps[0], after), "latencies_ms": _ms_list(series)})
    return results


def server_session_settings(repository: Path, model: str) -> dict:
    """ONNX Runtime settings the CPU server gives `model`'s graph (config.pbtxt parameters, read the
    way boot_serve/triton_model.py reads them: those of the one-hop boot_txt2img where it serves the
    graphs itself); {} for other backends."""
    from boot_serve.triton_repo import ENSEMBLE, parse_config

    onehop = repository / ENSEMBLE / "config.pbtxt"
    path = onehop if onehop.is_file() and parse_config(onehop.read_text()).backend == "python" else \
        repository / model / "config.pbtxt"
    if not path.is_file():
        return {}
    config = parse_config(path.read_text())
    if config.backend != "python":
        return {}
    params = {k: v.string_value for k, v in config.parameters.items()}
    return {"intra_op_num_threads": int(params.get("intra_op_thread_count", "0")),
            "allow_spinning": params.get("allow_spinning", "0"),
            "providers": [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",") if p.strip()]}


def floor_pipeline(repository: Path, threads: int = 0):
    """OnnxPipeline on `repository` whose sessions have the server's ONNX Runtime settings
    (threads, spinning, providers), so that floor and server differ only by the serving.
    Returns (pipeline, the settings per graph)."""
    import onnxruntime as ort

    from boot_serve.onnx_pipeline import MODELS, OnnxPipeline

    pipe = OnnxPipeline.from_pretrained(repository, threads=threads or None)
    settings = {}
    for model in MODELS:
        cfg = server_session_settings(repository, model)
        if not cfg:  # GPU variants: keep OnnxPipeline's own choice of providers
            settings[model] = {"providers": pipe.sessions[model].get_providers(), "as": "OnnxPipeline default"}
            continue
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads or cfg["intra_op_num_threads"]
        opts.add_session_config_entry("session.intra_op.allow_spinning", cfg["allow_spinning"])
        path = repository / pipe.manifest["graphs"][model]["path"]
        pipe.sessions[model] = ort.InferenceSession(str(path), opts, providers=cfg["providers"])
        settings[model] = {**cfg, "intra_op_num_threads": opts.intra_op_num_threads, "as": "server config.pbtxt"}
    return pipe, settings


def bench_pipeline(gen: Generate, prompts, seeds, guidance, n: int, warmup: int, max_seconds: float) -> dict:
    """One in-process pipeline, one request at a time (batch 1)."""
    series = closed_loop(lambda: nullcontext(gen), 1, prompts, seeds, guidance, n, warmup, max_seconds)
    if not series.latencies_s:
        raise BenchError(f"every call failed; first error: {series.errors[:1]}")
    return {**asdict(series.summary()), "error_samples": series.errors[:5], "latencies_ms": _ms_list(series)}


def interleaved(gens: dict[str, Generate], prompts, seeds, guidance, n: int, warmup: int, block: int,
                max_seconds: float) -> dict[str, Series]:
    """A/B(/C...) in the calling thread: `block` requests of each generator in turn, repeated
    until each has made `n` (or `max_seconds` have passed for the measured part). Request i of
    every generator uses the same prompt and seed."""
    for gen in gens.values():
        for i in range(warmup):
            gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
    series = {name: Series() for name in gens}
    start = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - start < max_seconds:
        size = min(block, n - done)
        for name, gen in gens.items():
            out = series[name]
            for i in range(done, done + size):
                t0 = time.perf_counter()
                try:
                    gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    out.errors.append(f"{type(err).__name__}: {err}")
                    continue
                elapsed = time.perf_counter() - t0
                out.latencies_s.append(elapsed)
                out.wall_s += elapsed  # one at a time: the wall time of this generator's requests
        done += size
    for name, out in series.items():
        if not out.latencies_s:
            raise BenchError(f"{name}: every request failed; first error: {out.errors[:1]}")
    return series


def bench_overhead(urls: dict[str, str], protocol: str, floor_pipe: Generate, prompts, seeds, guidance, n: int,
                   warmup: int, block: int, max_seconds: float) -> dict[str, dict]:
    """Compute floor and every server at concurrency 1, interleaved (see `interleaved`): "floor" and
    one entry per name of `urls`."""
    from boot_serve.client import Client

    with contextlib.ExitStack() as stack:
        gens = {"floor": floor_pipe}
        for name, url in urls.items():
            gens[name] = stack.enter_context(Client(url, protocol, concurrency=1)).generate
        series = interleaved(gens, prompts, seeds, guidance, n, warmup, block, max_seconds)
    return {name: {**asdict(s.summary()), "error_samples": s.errors[:5], "latencies_ms": _ms_list(s)}
            for name, s in series.items()}


def teacher_rounds(student: Generate, teacher: Generate, prompts, seeds, guidance, rounds: int, n_student: int,
                   warmup: int, max_seconds: float) -> dict[str, dict]:
    """Student and teacher in the calling thread, interleaved: `rounds` rounds of student calls
    (`n_student` in all, spread evenly, request indices in order), each followed by one teacher call
    (request r in round r). Returns both summaries, the student calls per round and the per-round
    ratios teacher / median student of the round."""
    for i in range(warmup):
        for gen in (student, teacher):
            gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
    series = {"student": Series(), "teacher": Series()}
    ratios, counts = [], []
    start = time.perf_counter()
    for r in range(rounds):
        if r and time.perf_counter() - start > max_seconds:
            break
        round_student = []
        lo, hi = r * n_student // rounds, (r + 1) * n_student // rounds
        counts.append(hi - lo)
        for i in range(lo, hi):
            round_student.append(_timed(student, prompts, seeds, guidance, i, series["student"]))
        t = _timed(teacher, prompts, seeds, guidance, r, series["teacher"])
        good = [x for x in round_student if x is not None]
        if t is not None and good:
            ratios.append(t / float(np.median(good)))
    for name, out in series.items():
        if not out.latencies_s:
            raise BenchError(f"{name}: every call failed; first error: {out.errors[:1]}")
    out = {name: {**asdict(s.summary()), "error_samples": s.errors[:5], "latencies_ms": _ms_list(s)}
           for name, s in series.items()}
    out["round_ratios"] = [round(x, 3) for x in ratios]
    out["round_student_calls"] = counts
    return out


def _timed(gen: Generate, prompts, seeds, guidance, i: int, out: Series) -> float | None:
    """One call of request i, recorded in `out`; its latency in seconds, None if it failed."""
    t0 = time.perf_counter()
    try:
        gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
    except Exception as err:  # noqa: BLE001 - counted and reported
        out.errors.append(f"{type(err).__name__}: {err}")
        return None
    elapsed = time.perf_counter() - t0
    out.latencies_s.append(elapsed)
    out.wall_s += elapsed
    return elapsed


def _ms_list(series: Series) -> list[float]:
    return [round(x * 1000, 3) for x in series.latencies_s]


# --------------------------------------------------------------------------------------------
# Headlines, report
# --------------------------------------------------------------------------------------------
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
             "| variant | concurrency | requests | errors | p50 ms | p90 ms | p99 ms | mean ms | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for server in report["servers"]:
        for r in server["served"]:
            lines.append(f"| {server['variant']} | {r['concurrency']} | {r['count']} | {r['errors']} | "
                         f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | "
                         f"{r['images_per_s']:.2f} |")
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
              "| run | requests | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|---|"]
    runs = [("compute floor, ONNX Runtime in-process", ab["floor"])]
    runs += [(f"served `{name}`, concurrency 1", r) for name, r in ab["served"].items()]
    for label, r in runs:
        lines.append(f"| {label} | {r['count']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['mean_ms']:.1f} |")
    return lines + [""]


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


# --------------------------------------------------------------------------------------------
# Servers of the --variants run
# --------------------------------------------------------------------------------------------
def variant_repository(repository: Path, variant: str, dest: Path) -> Path:
    """`dest` made a repository serving `variant`: links to `repository`'s exported files (graphs,
    tokenizer, manifest), its own configs and model.py files."""
    from boot_serve.triton_repo import write_configs

    for src in sorted(repository.rglob("*")):
        if src.is_dir() or src.name in ("config.pbtxt", "model.py") or "__pycache__" in src.parts:
            continue
        link = dest / src.relative_to(repository)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src.resolve())
    write_configs(dest, variant)
    return dest


@contextmanager
def started_servers(repository: Path, variants: Sequence[str], log=print):
    """{variant: TritonServer} of one server per variant, all ready; stopped on exit."""
    import tempfile

    from boot_serve.serve import TritonServer

    with tempfile.TemporaryDirectory(prefix="boot-bench-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for variant in variants:
            repo = variant_repository(repository, variant, Path(tmp) / variant)
            servers[variant] = stack.enter_context(TritonServer(repo, exit_timeout=5))
            log(f"[bench] {variant}: tritonserver ready at {servers[variant].http_url}")
        yield servers


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def _variants(text: str) -> list[str]:
    from boot_serve.triton_repo import VARIANTS, resolve_variant

    try:
        names = [resolve_variant(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated variants of {VARIANTS}, got {text!r}") from None
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct variants, got {text!r}")
    return names


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boot_serve.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="Triton server host:port serving boot_txt2img")
    target.add_argument("--variants", type=_variants,
                        help="start one tritonserver per repository variant on --repository and measure them side "
                             "by side, e.g. cpu-onehop,cpu-ensemble")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton protocol (default http)")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8],
                   help="concurrency levels, comma-separated (default 1,2,4,8)")
    p.add_argument("--requests", type=_positive(int), default=64,
                   help="measured requests per level and per in-process pipeline (default 64)")
    p.add_argument("--warmup", type=_non_negative, default=8,
                   help="warm-up requests before each level and each pipeline, not measured (default 8)")
    p.add_argument("--max-seconds", type=_positive(float), default=60.0,
                   help="time bound of each measured run; no new request after it (default 60)")
    p.add_argument("--ab-block", type=_positive(int), default=8,
                   help="block size of the interleaved floor / served-at-concurrency-1 run (default 8)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="the exported repository the server runs: compute floor in ONNX Runtime "
                        "(default model_repository)")
    p.add_argument("--student", type=Path, default=None,
                   help="student folder for the PyTorch comparison (default: the repository's source_student)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: no teacher comparison)")
    p.add_argument("--teacher-steps", type=_positive(int), default=50, help="teacher DDIM steps k (default 50)")
    p.add_argument("--teacher-requests", type=_positive(int), default=16,
                   help="teacher calls, each in its own round with student calls (default 16; each is k or 2k UNet "
                        "evaluations)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for every pipeline (default: the repository's recommended one)")
    p.add_argument("--threads", type=_non_negative, default=0,
                   help="intra-op threads of the in-process runs, torch and ONNX Runtime (default 0: torch's "
                        "default, and for ONNX Runtime the server's own setting read from config.pbtxt)")
    p.add_argument("--note", default=None, help="a line about this run for the report (what model, which machine)")
    p.add_argument("--out", type=Path, default=Path("docs/bench"), help="report folder (default docs/bench)")
    return p.parse_args(argv)


def _inputs(args: argparse.Namespace, log) -> tuple[dict, float, Path | None, list[str], list[int]]:
    """manifest, guidance, student folder, prompts, seeds of the run."""
    manifest_path = args.repository / "manifest.json"
    if not manifest_path.is_file():
        raise BenchError(f"{args.repository} has no manifest.json; give --repository of the exported repository "
                         "the server runs (python -m boot_serve.export), needed for the compute floor")
    manifest = json.loads(manifest_path.read_text())
    guidance = float(args.guidance if args.guidance is not None else manifest["guidance_scale"])
    student_dir = args.student or (Path(manifest["source_student"]) if manifest.get("source_student") else None)
    if student_dir is not None and not (student_dir / "boot.json").is_file():
        log(f"[bench] no student folder at {student_dir}: the PyTorch comparison uses the ONNX floor instead")
        student_dir = None
    n_prompts = max(args.requests, args.warmup, 1)
    from boot_serve.prompts import example_prompts

    prompts = example_prompts(n_prompts, PROMPT_OFFSET)
    return manifest, guidance, student_dir, prompts, [FIRST_SEED + i for i in range(n_prompts)]


def _load_warnings(hw: dict, load_start) -> list[str]:
    warnings = []
    if hw["benchmark_process_nice"] > 0:
        warnings.append(f"the benchmark ran at nice {hw['benchmark_process_nice']}: processes at a higher "
                        "priority on the same CPUs got their time first")
    if load_start and hw["usable_cpus"] and load_start[0] > 0.5 * hw["usable_cpus"]:
        warnings.append(f"the machine was busy before the benchmark started (load average {load_start[0]} on "
                        f"{hw['usable_cpus']} CPUs): other processes shared the CPUs, so every number here is "
                        "pessimistic and the ratios are noisier than on an idle machine")
    return warnings


def run(args: argparse.Namespace, argv: list[str] | None = None, log=print) -> dict:
    """Every measurement of the module docstring, in order; returns the report (also written)."""
    from boot_serve.triton_repo import served_variant

    manifest, guidance, student_dir, prompts, seeds = _inputs(args, log)
    load_start, hw = load_average(), hardware()
    warnings = _load_warnings(hw, load_start)
    if args.variants:
        servers_cm = started_servers(args.repository, args.variants, log)
    else:
        servers_cm = nullcontext({served_variant(args.repository): None})
    with servers_cm as started:
        urls = {v: (s.http_url if args.protocol == "http" else s.grpc_url) if s is not None else args.url
                for v, s in started.items()}
        floor_repo = next(iter(started.values())).repository if args.variants else args.repository
        # 1. served, over the concurrency sweep, one variant after the other
        servers = []
        for variant, url in urls.items():
            log(f"[bench] {variant} at {url}")
            servers.append({"variant": variant, "url": url,
                            "served": bench_server(url, args.protocol, args.concurrency, prompts, seeds, guidance,
                                                   args.requests, args.warmup, args.max_seconds, log)})
        # 2. compute floor: ONNX Runtime in-process, interleaved with every server at concurrency 1
        onnx_pipe, floor_settings = floor_pipeline(floor_repo, args.threads)
        ab = bench_overhead(urls, args.protocol, onnx_pipe, prompts, seeds, guidance, args.requests, args.warmup,
                            args.ab_block, args.max_seconds)
        server_meta = server_metadata(next(iter(urls.values())), args.protocol)
        server_settings = {m: server_session_settings(floor_repo, m) for m in floor_settings}
    del onnx_pipe
    floor = ab.pop("floor")
    ab = {"block": args.ab_block, "floor": floor, "served": ab}
    log(f"[bench] compute floor: p50 {floor['p50_ms']:.1f} ms; served at concurrency 1 in the same interleaved "
        "run: " + ", ".join(f"{v} p50 {r['p50_ms']:.1f} ms" for v, r in ab["served"].items()))
    pipelines = [{"key": "floor", "name": "student 1-step (compute floor)", "nfe": 1,
                  "runtime": f"ONNX Runtime {', '.join(floor_settings['boot_unet']['providers'])}, in-process",
                  "summary": floor}]

    # 3. student vs teacher in PyTorch, interleaved
    student, teacher, rounds = _student_and_teacher(args, student_dir, prompts, seeds, guidance, pipelines, log)
    threads = {"torch_in_process": _torch_threads(), "onnxruntime_floor": floor_settings,
               "server_onnxruntime": server_settings, "client_threads": "one per concurrent request (closed loop)"}

    # 4. report
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m boot_serve.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": args.note,
        "config": {"url": args.url, "variants": args.variants, "protocol": args.protocol,
                   "concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup,
                   "max_seconds": args.max_seconds, "repository": str(args.repository),
                   "student": _shown(student_dir) if student_dir else None,
                   "teacher": str(args.teacher) if args.teacher else None, "teacher_steps": args.teacher_steps,
                   "teacher_requests": args.teacher_requests, "guidance_scale": guidance,
                   "precision": manifest.get("precision"), "image_shape": manifest.get("image_shape"),
                   "prompts": f"boot_serve.prompts.example_prompts(n, {PROMPT_OFFSET}), seeds {FIRST_SEED}+i"},
        "hardware": hw, "versions": versions(), "server": server_meta,
        "threads": threads, "load_average": {"start": load_start, "end": load_average()}, "warnings": warnings,
        "headlines": headlines(servers, ab, student, teacher, args.teacher_steps, rounds["ratios"] if rounds else ()),
        "servers": servers, "overhead_ab": ab, "pipelines": pipelines, "teacher_rounds": rounds,
    }
    report["ranking"] = ranking(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.md").write_text(markdown(report))
    plot(report, args.out / "bench.png")
    return report


def _student_and_teacher(args, student_dir, prompts, seeds, guidance, pipelines: list, log):
    """PyTorch student alone, or interleaved with the teacher; appends their pipeline rows.
    Returns (student summary, teacher summary, rounds record) with None where not run."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    student_pipe = sampler = None
    if student_dir is not None:
        from boot.pipeline import BootPipeline

        student_pipe = BootPipeline.from_pretrained(student_dir)
    if args.teacher is not None:
        from boot.samplers import TeacherSampler

        sampler = TeacherSampler(args.teacher, args.teacher_steps, guidance)
    student = teacher = rounds = None
    if student_pipe is not None and sampler is not None:
        n = max(args.requests, args.teacher_requests)  # at least one student call per round
        both = teacher_rounds(student_pipe, sampler, prompts, seeds, guidance, args.teacher_requests, n,
                              min(args.warmup, 1), args.max_seconds * 10)
        student, teacher = both["student"], both["teacher"]
        rounds = {"student_calls": both["round_student_calls"], "ratios": both["round_ratios"]}
    elif student_pipe is not None:
        student = bench_pipeline(student_pipe, prompts, seeds, guidance, args.requests, args.warmup, args.max_seconds)
    elif sampler is not None:
        teacher = bench_pipeline(sampler, prompts, seeds, guidance, args.teacher_requests, min(args.warmup, 1),
                                 args.max_seconds * 10)
    if student is not None:
        pipelines.append({"key": "student_torch", "name": "student 1-step", "nfe": 1,
                          "runtime": "PyTorch eager, in-process", "summary": student})
        log(f"[bench] student PyTorch: p50 {student['p50_ms']:.1f} ms")
    if teacher is not None:
        pipelines.append({"key": "teacher", "name": f"teacher DDIM {args.teacher_steps} steps", "nfe": sampler.nfe,
                          "runtime": "PyTorch eager, in-process", "summary": teacher})
        log(f"[bench] teacher DDIM-{args.teacher_steps}: p50 {teacher['p50_ms']:.1f} ms")
    return student, teacher, rounds


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    return sys.modules["torch"].get_num_threads()


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the working directory where it lies below it (a report
    names no machine's absolute paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    from boot_serve.client import ClientError
    from boot_serve.serve import ServerError
    from boot_serve.triton_repo import RepositoryError

    args = parse_args(argv)
    try:
        report = run(args, argv)
    except (BenchError, ClientError, FileNotFoundError, ServerError, RepositoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "bench.md").read_text())
    print(f"written: {args.out}/bench.json, bench.md, bench.png")
    return 0 if all(r["errors"] == 0 for s in report["servers"] for r in s["served"]) else 1
