"""The load generator the benchmark and the soak test share: closed-loop clients at a fixed concurrency,
latency series and their percentiles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field

import numpy as np

PROMPT_OFFSET = 0


FIRST_SEED = 1_000_000


class BenchError(RuntimeError):
    """The benchmark could not run (no server, no repository, every request failed)."""


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
                between: Callable[[], None] | None = None, measured_offset: int = 0) -> Series:
    """`concurrency` threads, each with its own generator from `with make_generator() as gen`
    (entered in the thread that uses it: tritonclient's HTTP client is bound to its thread), each sending one
    single-image request at a time. First `warmup` requests (not recorded), then `between()` in
    the calling thread while every worker waits (statistics snapshot), then `n` measured
    requests. Each phase stops handing out requests after `max_seconds`; requests in flight
    finish. Warm-up request i uses prompts[i % len], seeds[i % len]; measured request i those at
    measured_offset + i (an offset of `warmup` sends the measured requests prompts the warm-up did not)."""
    phases = [_Phase(warmup, max_seconds), _Phase(n, max_seconds)]
    gates = [threading.Barrier(concurrency + 1) for _ in range(3)]  # ready, warmed up, measure
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[list[str]] = [[] for _ in range(concurrency)]
    setup_errors: list[str] = []

    def send(gen: Generate, phase: _Phase, lat: list[float] | None, errs: list[str], offset: int = 0) -> None:
        while (i := phase.take()) is not None:
            j = offset + i
            t0 = time.perf_counter()
            try:
                gen([prompts[j % len(prompts)]], [seeds[j % len(seeds)]], guidance)
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
                send(gen, phases[1], latencies[k], errors[k], measured_offset)
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

