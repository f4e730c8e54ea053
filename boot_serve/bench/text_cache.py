"""What the text-state cache saves per request: the served one-hop model's own code in this process, and
(--served) the served models of both CPU variants.

    python -m boot_serve.bench.text_cache --repository model_repository --served --out docs/bench/text-cache.json

Three copies of boot_serve/triton_model.py's OneHop on the repository, each with the server's ONNX
Runtime settings (the one-hop boot_txt2img's config.pbtxt parameters) and a cache bound of its own:
  miss: cache on, every request a prompt it has not seen (the text encoder runs, the states are stored);
  hit:  cache on, every request a prompt it already holds (the text encoder does not run);
  off:  text_cache_bytes 0 (no cache).
One request of one image at a time, `--block` requests of each copy in turn, repeated until each has
made `--requests` (so that a drift of the machine's load hits all three alike); per-request wall time
of OneHop.__call__ (checks, tokenizer, noise, the three graphs), p50 and quartiles. Also whether the
hit's images equal those of the copy without the cache, byte for byte. --served: the same miss and hit
arms through a real tritonserver per CPU variant, interleaved, with the server's own hit/miss counts
(`python -m boot_serve.bench --prompts unique|cycle` measures whole sweeps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from boot_serve.bench.machine import hardware, load_average
from boot_serve.prompts import distinct_example_prompts


def _onehop(repository: Path, cache_bytes: int):
    from boot_serve import triton_model
    from boot_serve.bench.measure import server_session_settings
    from boot_serve.triton_configs import TEXT_CACHE_BYTES

    settings = server_session_settings(repository, "boot_unet")
    params = {"intra_op_thread_count": str(settings.get("intra_op_num_threads", 0)),
              "allow_spinning": settings.get("allow_spinning", "0"),
              "providers": ",".join(settings.get("providers", ["CPUExecutionProvider"])),
              "text_cache_bytes": str(TEXT_CACHE_BYTES if cache_bytes < 0 else cache_bytes)}
    return triton_model.OneHop(repository, params), params


def _summary(ms: list[float]) -> dict:
    q = np.percentile(np.asarray(ms), [25, 50, 75])
    return {"requests": len(ms), "p25_ms": round(float(q[0]), 3), "p50_ms": round(float(q[1]), 3),
            "p75_ms": round(float(q[2]), 3), "mean_ms": round(float(np.mean(ms)), 3)}


def measure(repository: Path, requests: int = 200, block: int = 10, warmup: int = 10, guidance: float | None = None
            ) -> dict:
    """The three arms of the module docstring, interleaved; their summaries and the hit/miss image check."""
    arms = {name: _onehop(repository, -1 if name != "off" else 0)[0] for name in ("miss", "hit", "off")}
    prompts = distinct_example_prompts(warmup + requests + 1)  # the miss arm never repeats one
    held = prompts[-1]  # the hit arm's one prompt, cached by its first call
    for i in range(warmup):  # not timed: ONNX Runtime's first runs, the held prompt's first (miss) call
        for name, model in arms.items():
            _call(model, held if name == "hit" else prompts[i], i, guidance)
    times: dict[str, list[float]] = {name: [] for name in arms}
    same = True
    done = 0
    while done < requests:
        size = min(block, requests - done)
        for name, model in arms.items():
            for i in range(warmup + done, warmup + done + size):
                prompt = held if name == "hit" else prompts[i]
                t0 = time.perf_counter()
                image = _call(model, prompt, i, guidance)
                times[name].append((time.perf_counter() - t0) * 1000)
                if name == "hit" and i % 25 == 0:  # the same (prompt, seed) without the cache, untimed
                    same &= bool(np.array_equal(image, _call(arms["off"], prompt, i, guidance)))
        done += size
    stats = {name: model.text_encoder.cache.stats() if model.text_encoder.cache else None
             for name, model in arms.items()}
    out = {name: {**_summary(ms), "cache": stats[name]} for name, ms in times.items()}
    return {"arms": out, "hit_images_equal_uncached_images": same,
            "saved_per_hit_ms": round(out["miss"]["p50_ms"] - out["hit"]["p50_ms"], 3)}


def measure_served(repository: Path, requests: int = 200, block: int = 10, warmup: int = 10,
                   guidance: float | None = None) -> dict:
    """The same through real tritonservers, one per CPU variant (started here on copies of `repository`,
    default configs): per variant a miss arm (a prompt the server has not seen) and a hit arm (one held
    prompt), one request at a time over HTTP, interleaved in blocks across both variants; the server's own
    hit and miss counts per arm (its metrics, read between blocks)."""
    import contextlib

    from boot_serve.bench.servers import started_servers
    from boot_serve.bench.stats import text_cache_counts, text_cache_delta
    from boot_serve.client import Client
    from boot_serve.triton_configs import CPU_VARIANTS

    prompts = distinct_example_prompts(warmup + requests + 1)
    held = prompts[-1]
    with started_servers(repository, CPU_VARIANTS, log=lambda *a: None) as servers, contextlib.ExitStack() as stack:
        clients = {v: stack.enter_context(Client(s.http_url, "http", concurrency=1)) for v, s in servers.items()}
        for i in range(warmup):  # not timed; the held prompt reaches each instance's cache
            for client in clients.values():
                client.generate([prompts[i]], [i], guidance)
                client.generate([held], [i], guidance)
        arms = [(v, kind) for v in servers for kind in ("miss", "hit")]
        times: dict = {arm: [] for arm in arms}
        counts: dict = {arm: {"hits": 0, "misses": 0} for arm in arms}
        done = 0
        while done < requests:
            size = min(block, requests - done)
            for variant, kind in arms:
                before = text_cache_counts(servers[variant].metrics_url)
                for i in range(warmup + done, warmup + done + size):
                    prompt = held if kind == "hit" else prompts[i]
                    t0 = time.perf_counter()
                    clients[variant].generate([prompt], [i], guidance)
                    times[(variant, kind)].append((time.perf_counter() - t0) * 1000)
                delta = text_cache_delta(before, text_cache_counts(servers[variant].metrics_url)) or {}
                for key in ("hits", "misses"):
                    counts[(variant, kind)][key] += delta.get(key, 0)
            done += size
    out: dict = {}
    for (variant, kind), ms in times.items():
        out.setdefault(variant, {})[kind] = {**_summary(ms), "server_cache": counts[(variant, kind)]}
    for arms_of in out.values():
        arms_of["saved_per_hit_ms"] = round(arms_of["miss"]["p50_ms"] - arms_of["hit"]["p50_ms"], 3)
    return out


def _call(model, prompt: str, seed: int, guidance: float | None) -> np.ndarray:
    scales = None if guidance is None else [guidance]
    (result,) = model([([prompt.encode()], np.array([seed], dtype=np.int64),
                        None if scales is None else np.array(scales, dtype=np.float32))])
    if isinstance(result, Exception):
        raise result
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m boot_serve.bench.text_cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="exported repository")
    p.add_argument("--requests", type=int, default=200, help="timed requests per arm")
    p.add_argument("--block", type=int, default=10, help="requests of one arm before the next arm's")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per arm first")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the student's)")
    p.add_argument("--served", action="store_true",
                   help="also through a tritonserver per CPU variant (miss and hit arms per variant, interleaved)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the result (default: print only)")
    args = p.parse_args(argv)
    if args.requests + args.warmup + 1 > 708:
        print("error: --requests + --warmup must stay under 708 (the different example prompts)", file=sys.stderr)
        return 2
    load_start = load_average()
    result = measure(args.repository, args.requests, args.block, args.warmup, args.guidance)
    if args.served:
        result["served"] = measure_served(args.repository, args.requests, args.block, args.warmup, args.guidance)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python -m boot_serve.bench.text_cache "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": _onehop(args.repository, -1)[1], "hardware": hardware(),
              "load_average": {"start": load_start, "end": load_average()}, **result}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for name, arm in result["arms"].items():
        print(f"{name:>4}: p50 {arm['p50_ms']:.2f} ms (quartiles {arm['p25_ms']:.2f} / {arm['p75_ms']:.2f}), "
              f"{arm['requests']} requests")
    print(f"a hit saves {result['saved_per_hit_ms']:.2f} ms at p50; hit images equal uncached images: "
          f"{result['hit_images_equal_uncached_images']}")
    for variant, arms in result.get("served", {}).items():
        print(f"served {variant}: miss p50 {arms['miss']['p50_ms']:.2f} ms, hit p50 {arms['hit']['p50_ms']:.2f} ms "
              f"(server counted hits/misses: miss arm {arms['miss']['server_cache']}, hit arm "
              f"{arms['hit']['server_cache']}); a hit saves {arms['saved_per_hit_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
