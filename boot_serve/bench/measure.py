"""The measurements: a concurrency sweep against a server, the in-process ONNX Runtime floor interleaved
with the servers at concurrency 1, in-process pipelines, and the student-vs-teacher rounds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from boot_serve.bench.loadgen import BenchError, Generate, Series, closed_loop
from boot_serve.bench.stats import settled_snapshot, snapshot, stats_delta, text_cache_counts, text_cache_delta
from boot_serve.triton_configs import MODELS as SERVER_MODELS

PROMPT_MODES = ("cycle", "unique")


def prompts_needed(mode: str, levels: int, n: int, warmup: int) -> int:
    """Prompts a run needs: `cycle` reuses one list of max(n, warmup) prompts in every level and the
    interleaved run; `unique` gives every request a prompt no earlier request of the run sent to the same
    server: each level and the interleaved run its own warmup + n."""
    return (levels + 1) * (warmup + n) if mode == "unique" else max(n, warmup, 1)


def run_prompts(mode: str, prompts, seeds, k: int, n: int, warmup: int) -> tuple[list, list, int]:
    """(prompts, seeds, measured offset) of run k (level k of the sweep; k = the number of levels: the
    interleaved run at concurrency 1) under `mode` (prompts_needed)."""
    if mode == "cycle":
        return list(prompts), list(seeds), 0
    lo, hi = k * (warmup + n), (k + 1) * (warmup + n)
    return list(prompts[lo:hi]), list(seeds[lo:hi]), warmup


def bench_server(url: str, protocol: str, levels: Sequence[int], prompts, seeds, guidance, n: int, warmup: int,
                 max_seconds: float, log=print, operator_key: str | None = None, prompt_mode: str = "cycle",
                 metrics_url: str | None = None) -> list[dict]:
    """The concurrency sweep. `metrics_url`: the server's Prometheus endpoint, read before and after each
    level for the text-state cache's hits and misses (None: not reported)."""
    from boot_serve.client import Client

    @contextmanager
    def client_generate():
        with Client(url, protocol, concurrency=1) as client:
            yield client.generate

    with Client(url, protocol, operator_key=operator_key) as probe:  # the key opens Triton's statistics
        probe.check()  # ServerUnavailableError with what to run, before any thread starts
        results = []
        for k, c in enumerate(levels):
            snaps: list[dict] = []
            cache: list = []

            def between(snaps=snaps, cache=cache):
                snaps.append(snapshot(probe, SERVER_MODELS))
                cache.append(text_cache_counts(metrics_url))

            level_prompts, level_seeds, offset = run_prompts(prompt_mode, prompts, seeds, k, n, warmup)
            series = closed_loop(client_generate, c, level_prompts, level_seeds, guidance, n, warmup, max_seconds,
                                 between=between, measured_offset=offset)
            after = settled_snapshot(probe, snaps[0], len(series.latencies_s) + len(series.errors))
            if not series.latencies_s:
                raise BenchError(f"concurrency {c}: every request failed; first error: {series.errors[:1]}")
            s = series.summary()
            text_cache = text_cache_delta(cache[0], text_cache_counts(metrics_url))
            log(f"[bench] served c={c}: {s.count} ok, {s.errors} failed, p50 {s.p50_ms:.1f} ms, "
                f"p99 {s.p99_ms:.1f} ms, {s.images_per_s:.2f} images/s"
                + (f", text-cache hit rate {text_cache['hit_rate']:.2f}" if text_cache else ""))
            results.append({"concurrency": c, **asdict(s), "error_samples": series.errors[:5],
                            "server": stats_delta(snaps[0], after), "text_cache": text_cache,
                            "latencies_ms": _ms_list(series)})
    return results


def server_session_settings(repository: Path, model: str) -> dict:
    """ONNX Runtime settings the CPU server gives `model`'s graph (config.pbtxt parameters, read the
    way boot_serve/triton_model.py reads them: those of the one-hop boot_txt2img where it serves the
    graphs itself); {} for other backends."""
    from boot_serve.triton_configs import ENSEMBLE, parse_config

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
                max_seconds: float, measured_offset: int = 0, between=None) -> dict[str, Series]:
    """A/B(/C...) in the calling thread: `block` requests of each generator in turn, repeated
    until each has made `n` (or `max_seconds` have passed for the measured part). Request i of
    every generator uses the same prompt and seed: warm-up request i those at i, measured request i
    those at measured_offset + i (modulo the list). `between()` runs after the warm-up."""
    for gen in gens.values():
        for i in range(warmup):
            gen([prompts[i % len(prompts)]], [seeds[i % len(seeds)]], guidance)
    if between is not None:
        between()
    series = {name: Series() for name in gens}
    start = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - start < max_seconds:
        size = min(block, n - done)
        for name, gen in gens.items():
            out = series[name]
            for i in range(measured_offset + done, measured_offset + done + size):
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
                   warmup: int, block: int, max_seconds: float, measured_offset: int = 0,
                   metrics_urls: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Compute floor and every server at concurrency 1, interleaved (see `interleaved`): "floor" and
    one entry per name of `urls` (with its text-state cache's hits and misses where `metrics_urls` has
    its Prometheus endpoint)."""
    from boot_serve.client import Client

    metrics_urls = metrics_urls or {}
    with contextlib.ExitStack() as stack:
        gens = {"floor": floor_pipe}
        for name, url in urls.items():
            gens[name] = stack.enter_context(Client(url, protocol, concurrency=1)).generate
        before: dict = {}
        series = interleaved(gens, prompts, seeds, guidance, n, warmup, block, max_seconds, measured_offset,
                             between=lambda: before.update({k: text_cache_counts(metrics_urls.get(k)) for k in urls}))
        after = {name: text_cache_counts(metrics_urls.get(name)) for name in urls}
    out = {name: {**asdict(s.summary()), "error_samples": s.errors[:5], "latencies_ms": _ms_list(s)}
           for name, s in series.items()}
    for name in urls:
        out[name]["text_cache"] = text_cache_delta(before[name], after[name])
    return out


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

