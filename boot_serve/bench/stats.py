"""Triton's own statistics (queue and compute time per model, batch sizes) between two snapshots."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from boot_serve.triton_configs import MODELS as SERVER_MODELS

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
    from boot_serve.triton_configs import ENSEMBLE

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
# The text-state cache's counters (Triton custom metrics of boot_serve/triton_model.py)
# --------------------------------------------------------------------------------------------
TEXT_CACHE_COUNTERS = ("hits", "misses")


def parse_text_cache(text: str) -> dict[str, float]:
    """boot_text_cache_hits / _misses of a Prometheus text exposition, summed over every model and
    instance that reports them (each instance keeps its own cache)."""
    out = dict.fromkeys(TEXT_CACHE_COUNTERS, 0.0)
    for line in text.splitlines():
        if not line.startswith("boot_text_cache_"):
            continue
        name, _, rest = line.partition("{")
        key = name[len("boot_text_cache_"):]
        if key in out:
            out[key] += float(rest.rpartition("}")[2].split()[0])
    return out


class MetricsError(Exception):
    """The server's Prometheus endpoint could not be read."""


def text_cache_counts(metrics_url: str | None, timeout: float = 10.0) -> dict[str, float] | None:
    """The server's text-state cache counters now, None without a metrics URL or when its metrics have
    none (a variant without the cache, or with the cache off: text_cache_bytes 0)."""
    if not metrics_url:
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ValueError, OSError) as err:
        raise MetricsError(f"cannot read the server's metrics at {metrics_url!r} ({err}); give --metrics-url as "
                           "http://HOST:PORT/metrics") from None
    return parse_text_cache(text) if "boot_text_cache_" in text else None


def text_cache_delta(before: dict | None, after: dict | None) -> dict | None:
    """Hits, misses and hit rate (hits / prompts looked up) between two readings; None if either is."""
    if before is None or after is None:
        return None
    hits, misses = (int(round(after[k] - before[k])) for k in TEXT_CACHE_COUNTERS)
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else float("nan")}
