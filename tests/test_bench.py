"""Benchmark: a short real run of both CPU variants side by side (`--variants`: the bench starts one
tritonserver per variant on the tiny exported repository of conftest.py), then the report is checked
against itself and against the servers' own counters.

- counts: every measured request completed, the server saw exactly those (warm-up excluded);
- percentiles ordered and equal to numpy's over the raw latencies kept in the report;
- throughput = count / wall time; headline ratios recomputed from the tables;
- JSON, Markdown and PNG written; a missing server is a readable error, not a traceback.
Plus golden values for the statistics helpers and the closed-loop load generator's bounds.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boot_serve import bench
from boot_serve.triton_process import find_free_port

LEVELS = (1, 3)
REQUESTS = 7
TEACHER_STEPS = 3


@pytest.fixture(scope="module")
def teacher_dir(served_student) -> Path:
    return Path(json.loads((Path(served_student) / "boot.json").read_text())["teacher"])


VARIANTS = ("cpu-onehop", "cpu-ensemble")
LOADED = {"cpu-onehop": {"boot_txt2img"},  # the composing models' configs are there, not loaded
          "cpu-ensemble": {"boot_txt2img", "preprocess", "text_encoder", "boot_unet", "vae_decoder"}}


@pytest.fixture(scope="module")
def run(exported_repository, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    argv = ["--variants", ",".join(VARIANTS), "--concurrency", ",".join(map(str, LEVELS)),
            "--requests", str(REQUESTS), "--warmup", "2", "--max-seconds", "120",
            "--repository", str(exported_repository), "--teacher", str(teacher_dir),
            "--teacher-steps", str(TEACHER_STEPS), "--teacher-requests", "2", "--out", str(out)]
    code = bench.main(argv)
    return code, out, json.loads((out / "bench.json").read_text())


# --------------------------------------------------------------------------------------------
# The real run
# --------------------------------------------------------------------------------------------
def test_writes_json_markdown_and_plot(run):
    code, out, report = run
    assert code == 0
    md = (out / "bench.md").read_text()
    for text in ("## Headline", "speedup_vs_teacher", "serving_overhead_c1", "throughput_ratio",
                 "compute floor", f"teacher DDIM {TEACHER_STEPS} steps", report["hardware"]["cpu"]):
        assert text in md, text
    for variant in VARIANTS:
        for c in LEVELS:
            assert f"\n| {variant} | {c} | {REQUESTS} | 0 |" in md
    assert "Variants, best first" in md
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.width >= 600 and png.height >= 300


@pytest.mark.parametrize("variant", VARIANTS)
def test_served_levels_are_consistent(run, variant):
    _, _, report = run
    assert [s["variant"] for s in report["servers"]] == list(VARIANTS)
    served = next(s["served"] for s in report["servers"] if s["variant"] == variant)
    assert [r["concurrency"] for r in served] == list(LEVELS)
    for r in served:
        lat = np.array(r["latencies_ms"])
        assert r["count"] == REQUESTS == len(lat) and r["errors"] == 0
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        np.testing.assert_allclose([r["p50_ms"], r["p90_ms"], r["p99_ms"]], np.percentile(lat, [50, 90, 99]),
                                   atol=2e-3)  # latencies_ms are kept to the microsecond
        assert r["images_per_s"] == pytest.approx(r["count"] / r["wall_s"])
        # The level's wall time holds its slowest request, and c threads cannot do better than
        # running all requests side by side.
        assert r["wall_s"] * 1000 >= r["max_ms"]
        assert r["wall_s"] * 1000 * r["concurrency"] >= lat.sum() * 0.999
        # The server counted exactly the measured requests: warm-up excluded, none lost.
        server = r["server"]
        assert set(server) == LOADED[variant]
        for model, s in server.items():
            assert s["requests"] == REQUESTS and s["failed"] == 0, model
            assert s["queue_ms"] >= 0 and s["compute_ms"] > 0, model
            assert 1 <= s["mean_batch"] <= r["concurrency"], model
        # Server-side time of a request cannot exceed what the client waited for it.
        assert server["boot_txt2img"]["total_ms"] <= lat.mean() * 1.001
        # The text-state cache looked up each measured request's prompt once (its metrics, warm-up excluded).
        assert r["text_cache"]["hits"] + r["text_cache"]["misses"] == REQUESTS
    if variant == "cpu-ensemble":  # one cache (cpu-onehop: one per instance, and either may get a prompt)
        assert served[-1]["text_cache"]["hit_rate"] == 1.0  # --prompts cycle: every prompt was sent before


def test_pipelines_and_headlines(run, exported_repository):
    _, _, report = run
    rows = {row["key"]: row for row in report["pipelines"]}
    assert set(rows) == {"floor", "student_torch", "teacher"}
    assert rows["floor"]["summary"]["count"] == rows["student_torch"]["summary"]["count"] == REQUESTS
    for key in ("floor", "student_torch", "teacher"):  # one call at a time: wall time = sum of latencies
        s = rows[key]["summary"]
        assert s["images_per_s"] == pytest.approx(s["count"] / s["wall_s"])
        assert s["wall_s"] * 1000 >= s["mean_ms"] * s["count"] * 0.999
    assert rows["teacher"]["summary"]["count"] == 2
    manifest = json.loads((exported_repository / "manifest.json").read_text())
    assert report["config"]["guidance_scale"] == manifest["guidance_scale"] != 1.0
    assert rows["teacher"]["nfe"] == 2 * TEACHER_STEPS  # classifier-free guidance: two UNet calls a step
    assert report["config"]["student"] == manifest["source_student"]
    for row in rows.values():
        s = row["summary"]
        assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]

    p50 = {k: row["summary"]["p50_ms"] for k, row in rows.items()}
    speedup = bench.headline(report, "speedup_vs_teacher")
    assert speedup["value"] == pytest.approx(p50["teacher"] / p50["student_torch"])
    assert "both PyTorch" in speedup["basis"]
    # Interleaved rounds: one teacher call each, and the spread is that of the per-round ratios.
    ratios = report["teacher_rounds"]["ratios"]
    assert len(ratios) == speedup["spread"]["rounds"] == 2
    assert speedup["spread"]["min"] == pytest.approx(min(ratios)) and speedup["spread"]["max"] == pytest.approx(
        max(ratios))
    teacher_ms = rows["teacher"]["summary"]["latencies_ms"]
    student_ms = rows["student_torch"]["summary"]["latencies_ms"]
    first = report["teacher_rounds"]["student_calls"][0]
    assert sum(report["teacher_rounds"]["student_calls"]) == REQUESTS
    assert ratios[0] == pytest.approx(teacher_ms[0] / np.median(student_ms[:first]), rel=1e-3)
    ab = report["overhead_ab"]
    assert ab["floor"]["p50_ms"] == p50["floor"] and ab["floor"]["count"] == REQUESTS
    for server in report["servers"]:
        v = server["variant"]
        served = {r["concurrency"]: r for r in server["served"]}
        overhead = bench.headline(report, "serving_overhead_c1", v)
        ratio = bench.headline(report, "throughput_ratio", v)
        assert ab["served"][v]["count"] == REQUESTS
        assert ab["served"][v]["text_cache"]["hits"] + ab["served"][v]["text_cache"]["misses"] == REQUESTS
        assert overhead["value"] == pytest.approx(ab["served"][v]["p50_ms"] / p50["floor"] - 1)
        assert overhead["met"] == (overhead["value"] <= 0.10)
        assert ratio["value"] == pytest.approx(served[3]["images_per_s"] / served[1]["images_per_s"])
        assert ratio["met"] is None  # the goal is about 8 vs 1; this sweep has no 8
        assert bench.headline(report, "p99_c3", v)["value"] == served[3]["p99_ms"]
    assert sorted(report["ranking"]) == sorted(VARIANTS)
    # The floor runs the server's ONNX Runtime settings, read from the repository's configs.
    assert report["threads"]["onnxruntime_floor"]["boot_unet"]["as"] == "server config.pbtxt"


def test_records_hardware_and_versions(run):
    _, _, report = run
    hw = report["hardware"]
    assert hw["cpu"] and hw["usable_cpus"] >= 1 and isinstance(hw["gpus"], list)
    assert {"python", "numpy", "tritonclient", "torch"} <= set(report["versions"])
    assert report["server"]["name"] == "triton" and report["server"]["version"]
    assert len(report["load_average"]["start"]) == 3


def test_no_server_is_a_readable_error(exported_repository, tmp_path, capsys):
    port = find_free_port()
    code = bench.main(["--url", f"127.0.0.1:{port}", "--repository", str(exported_repository),
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no Triton server answers" in err and "Traceback" not in err
    assert not (tmp_path / "bench.json").exists()


def test_cli_rejects_bad_levels(capsys):
    for bad in ("0,1", "a,b", ""):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(["--url", "x:1", "--concurrency", bad])
        assert exc.value.code == 2
    assert bench.parse_args(["--url", "x:1", "--concurrency", "8,1,2,2"]).concurrency == [1, 2, 8]


# --------------------------------------------------------------------------------------------
# Helpers, no server
# --------------------------------------------------------------------------------------------
def test_summary_golden_values():
    s = bench.Summary.of([i / 1000 for i in range(1, 101)], wall_s=2.0, errors=3)  # 1..100 ms
    assert (s.count, s.errors) == (100, 3)
    assert (s.p50_ms, s.p90_ms, s.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert (s.min_ms, s.max_ms, s.mean_ms) == pytest.approx((1.0, 100.0, 50.5))
    assert s.images_per_s == pytest.approx(50.0)
    with pytest.raises(bench.BenchError):
        bench.Summary.of([], 1.0)


def test_statistics_delta_reads_both_protocols():
    http = {"model_stats": [{"inference_count": 12, "execution_count": 4, "inference_stats": {
        "success": {"count": 12, "ns": 120_000_000}, "fail": {"count": 0, "ns": 0},
        "queue": {"count": 12, "ns": 24_000_000}, "compute_input": {"count": 12, "ns": 1_200_000},
        "compute_infer": {"count": 12, "ns": 60_000_000}, "compute_output": {"count": 12, "ns": 1_200_000}}}]}
    grpc_before = {"model_stats": [{"inference_count": "2", "execution_count": "2", "inference_stats": {
        "success": {"count": "2", "ns": "20000000"}, "queue": {"count": "2", "ns": "4000000"},
        "compute_infer": {"count": "2", "ns": "10000000"}}}]}  # gRPC: strings, zeros left out
    d = bench.stats_delta({"m": bench.model_counters(grpc_before)}, {"m": bench.model_counters(http)})["m"]
    assert (d["requests"], d["executions"], d["inferences"], d["failed"]) == (10, 2, 10, 0)
    assert d["mean_batch"] == pytest.approx(5.0)
    assert d["queue_ms"] == pytest.approx(2.0)
    assert d["compute_infer_ms"] == pytest.approx(5.0)
    assert d["compute_ms"] == pytest.approx(5.24)
    assert d["total_ms"] == pytest.approx(10.0)


def test_closed_loop_counts_bounds_and_errors():
    calls, lock = [], threading.Lock()
    threads_seen = set()

    def gen(prompts, seeds, guidance):
        with lock:
            calls.append(seeds[0])
            threads_seen.add(threading.get_ident())
        time.sleep(0.01)
        if seeds[0] % 5 == 0:
            raise ValueError("bad seed")

    seeds = list(range(1, 101))
    series = bench.closed_loop(lambda: nullcontext(gen), 3, ["p"] * 100, seeds, None, n=12, warmup=4,
                               max_seconds=30)
    assert len(calls) == 16  # 4 warm-up + 12 measured
    assert sorted(calls) == sorted(seeds[:4] + seeds[:12])  # request i of each phase uses seeds[i]
    assert len(series.latencies_s) + len(series.errors) == 12
    assert len(series.errors) == 2 and series.errors[0] == "ValueError: bad seed"  # seeds 5 and 10
    assert all(lat >= 0.009 for lat in series.latencies_s) and len(threads_seen) == 3

    # Time bound: no new request after max_seconds, whatever n says.
    start = time.perf_counter()
    series = bench.closed_loop(lambda: nullcontext(gen), 2, ["p"], [1], None, n=10_000, warmup=0, max_seconds=0.2)
    assert time.perf_counter() - start < 2.0
    assert 2 <= len(series.latencies_s) < 10_000 and series.wall_s < 1.0


def test_closed_loop_reports_setup_failure():
    def broken():
        raise ConnectionError("refused")

    with pytest.raises(bench.BenchError, match="refused"):
        bench.closed_loop(broken, 2, ["p"], [1], None, n=3, warmup=0, max_seconds=5)


def test_unique_prompts_are_never_sent_twice():
    levels, n, warmup = 3, 5, 2
    prompts = [f"p{i}" for i in range(bench.prompts_needed("unique", levels, n, warmup))]
    seeds = list(range(len(prompts)))
    sent = []
    for k in range(levels + 1):  # each level, then the interleaved run
        run_prompts, run_seeds, offset = bench.run_prompts("unique", prompts, seeds, k, n, warmup)
        calls, lock = [], threading.Lock()

        def gen(p, s, g, calls=calls, lock=lock):
            with lock:
                calls.append(p[0])

        bench.closed_loop(lambda gen=gen: nullcontext(gen), 2, run_prompts, run_seeds, None, n, warmup, 30,
                          measured_offset=offset)
        sent += calls
    assert len(sent) == (levels + 1) * (n + warmup) == len(set(sent))
    assert bench.run_prompts("cycle", prompts[:n], seeds[:n], 2, n, warmup) == (prompts[:n], seeds[:n], 0)


def test_interleaved_alternates_blocks():
    order = []
    gens = {"a": lambda p, s, g: order.append(("a", s[0])), "b": lambda p, s, g: order.append(("b", s[0]))}
    series = bench.interleaved(gens, ["p"], list(range(100)), None, n=5, warmup=1, block=2, max_seconds=30)
    assert order[:2] == [("a", 0), ("b", 0)]  # warm-up: one each
    assert order[2:] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("b", 3),
                         ("a", 4), ("b", 4)]
    assert all(len(s.latencies_s) == 5 and s.wall_s == pytest.approx(sum(s.latencies_s)) for s in series.values())


def test_guard_bench_reports_both_paths_from_one_served_process(exported_repository, tmp_path):
    """boot_serve.bench.guard on the default served stack: every path answered every request, the
    overhead is the ratio of the reported p50s, and the report, Markdown and plot are written."""
    from boot_serve.bench import guard

    out = tmp_path / "guard"
    assert guard.main(["--repository", str(exported_repository), "--concurrency", "1", "--requests", "4",
                       "--rounds", "1", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = report["results"]
    for path in guard.PATHS:
        assert row[path]["count"] == 4 and row[path]["errors"] == 0 and row[path]["p50_ms"] > 0, (path, row[path])
    for proto in ("http", "grpc"):
        ratio = row[f"{proto} guarded"]["p50_ms"] / row[f"{proto} direct"]["p50_ms"] - 1
        assert row[f"{proto} p50 overhead"] == pytest.approx(ratio)
    assert "text-cache hit" in (out / "report.md").read_text()
    assert Image.open(out / "latency.png").size[0] > 0


@pytest.mark.parametrize("url", ["127.0.0.1:1", "http://127.0.0.1:1/metrics"])
def test_an_unreadable_metrics_url_is_a_readable_error(url):
    from boot_serve.bench.stats import MetricsError, text_cache_counts

    with pytest.raises(MetricsError, match=r"cannot read the server's metrics .* http://HOST:PORT/metrics"):
        text_cache_counts(url)
