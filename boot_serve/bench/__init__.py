"""Benchmark: the served student over a concurrency sweep, its compute floor, and the teacher.

    python -m boot_serve.bench --variants cpu-onehop,cpu-ensemble --repository model_repository \\
        --teacher pretrained/shapes-teacher --teacher-steps 50 --out docs/bench  # its own servers
    python -m boot_serve.bench --url 127.0.0.1:8000 --repository model_repository  # a running one
    python -m boot_serve.bench --url 127.0.0.1:8001 --protocol grpc --concurrency 1,4,16 \\
        --requests 200
    python -m boot_serve.bench --in-process --device cuda ...    # no server: bench/inprocess.py

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
     The text-state cache's hits and misses over the level (the server's Prometheus metrics
     boot_text_cache_*, CPU variants) give its hit rate. Prompts (--prompts): `cycle` sends the
     same list in every level, so after the first pass each prompt is a cache hit; `unique` sends
     each level (and the interleaved run below) prompts the server has not seen, warm-up included:
     every request misses, which measures the text encoder's full cost.
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
import datetime
import json
import secrets
import sys
from contextlib import nullcontext
from pathlib import Path

from boot.cli import Parser, number_list
from boot_serve import access
from boot_serve.access import new_key
from boot_serve.bench.loadgen import FIRST_SEED, PROMPT_OFFSET, BenchError
from boot_serve.bench.machine import hardware, load_average, server_metadata, versions
from boot_serve.bench.measure import (
    PROMPT_MODES,
    bench_overhead,
    bench_pipeline,
    bench_server,
    floor_pipeline,
    prompts_needed,
    run_prompts,
    server_session_settings,
    teacher_rounds,
)
from boot_serve.bench.report import headlines, markdown, plot, ranking
from boot_serve.bench.servers import started_servers


def _variants(text: str) -> list[str]:
    from boot_serve.triton_configs import VARIANTS, resolve_variant

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


def parser() -> Parser:
    summary, examples, details = __doc__.split("\n\n", 2)
    p = Parser(prog="python -m boot_serve.bench", description=f"{summary}\n\n{examples}", details=details,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="Triton server host:port serving boot_txt2img")
    target.add_argument("--variants", type=_variants,
                        help="start one tritonserver per repository variant on --repository and measure them side "
                             "by side, e.g. cpu-onehop,cpu-ensemble")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton protocol (default http)")
    p.add_argument("--concurrency", type=number_list(int, 1, unique=True), default=[1, 2, 4, 8],
                   help="concurrency levels, comma-separated (default 1,2,4,8)")
    p.add_argument("--requests", type=_positive(int), default=64,
                   help="measured requests per level and per in-process pipeline (default 64)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="the exported repository the server runs: compute floor in ONNX Runtime "
                        "(default model_repository)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: no teacher comparison)")
    p.add_argument("--out", type=Path, default=Path("docs/bench"), help="report folder (default docs/bench)")
    x = p.operator_group("measurement details (experts)")
    x.add_argument("--warmup", type=_non_negative, default=8,
                   help="warm-up requests before each level and each pipeline, not measured (default 8)")
    x.add_argument("--max-seconds", type=_positive(float), default=60.0,
                   help="time bound of each measured run; no new request after it (default 60)")
    x.add_argument("--prompts", choices=PROMPT_MODES, default="cycle",
                   help="cycle: one list of prompts in every level (a repeated prompt is a text-state cache hit); "
                        "unique: no prompt is sent twice to a server (every request a cache miss)")
    x.add_argument("--run-tag", type=int, default=None,
                   help="with --prompts unique: the number after every caption that makes the prompts new to a "
                        "server that served an earlier run (default: a random one, recorded in the report)")
    x.add_argument("--metrics-url", default=None,
                   help="with --url: the server's Prometheus endpoint (http://host:8002/metrics), read for the "
                        "text-state cache's hit rate (servers started by --variants: their own)")
    x.add_argument("--ab-block", type=_positive(int), default=8,
                   help="block size of the interleaved floor / served-at-concurrency-1 run (default 8)")
    x.add_argument("--student", type=Path, default=None,
                   help="student folder for the PyTorch comparison (default: the repository's source_student)")
    x.add_argument("--teacher-steps", type=_positive(int), default=50, help="teacher DDIM steps k (default 50)")
    x.add_argument("--teacher-requests", type=_positive(int), default=16,
                   help="teacher calls, each in its own round with student calls (default 16; each is k or 2k UNet "
                        "evaluations)")
    x.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for every pipeline (default: the repository's recommended one)")
    x.add_argument("--threads", type=_non_negative, default=0,
                   help="intra-op threads of the in-process runs, torch and ONNX Runtime (default 0: torch's "
                        "default, and for ONNX Runtime the server's own setting read from config.pbtxt)")
    x.add_argument("--operator-key-file", type=Path, default=None,
                   help="file holding the server's operator key, which opens Triton's statistics for the report "
                        "(python -m boot_serve.serve prints where it is; default: $BOOT_OPERATOR_KEY; without one "
                        "the report has no server-side split)")
    x.add_argument("--note", default=None, help="a line about this run for the report (what model, which machine)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.run_tag is None:
        args.run_tag = secrets.randbelow(900_000) + 100_000  # six digits: a caption keeps within 16 tokens
    return args


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
    n_prompts = prompts_needed(args.prompts, len(args.concurrency), args.requests, args.warmup)
    from boot_serve.prompts import distinct_example_prompts, example_prompts

    if args.prompts == "unique":
        try:
            prompts = distinct_example_prompts(n_prompts, PROMPT_OFFSET)
        except ValueError as err:
            raise BenchError(f"--prompts unique needs {n_prompts} different prompts ((levels + 1) x (--warmup + "
                             f"--requests)): {err}; lower --requests or --warmup") from None
        # A server keeps the text states of the prompts it has served (an earlier run of this bench, the demo):
        # the run's own tag after each caption makes every prompt one no server has seen.
        prompts = [f"{p} {args.run_tag}" for p in prompts]
        return manifest, guidance, student_dir, prompts, [FIRST_SEED + i for i in range(n_prompts)]

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
    # Triton answers its statistics to operators only: the key of the servers started here, or
    # the one the operator gives for --url.
    operator_key = new_key() if args.variants else access.read_key(args.operator_key_file)
    if args.variants:
        servers_cm = started_servers(args.repository, args.variants, log, operator_key)
    else:
        servers_cm = nullcontext({served_variant(args.repository): None})
    with servers_cm as started:
        urls = {v: (s.http_url if args.protocol == "http" else s.grpc_url) if s is not None else args.url
                for v, s in started.items()}
        metrics_urls = {v: s.metrics_url if s is not None else args.metrics_url for v, s in started.items()}
        floor_repo = next(iter(started.values())).repository if args.variants else args.repository
        # 1. served, over the concurrency sweep, one variant after the other
        servers = []
        for variant, url in urls.items():
            log(f"[bench] {variant} at {url}")
            servers.append({"variant": variant, "url": url,
                            "served": bench_server(url, args.protocol, args.concurrency, prompts, seeds, guidance,
                                                   args.requests, args.warmup, args.max_seconds, log,
                                                   operator_key, args.prompts, metrics_urls[variant])})
        # 2. compute floor: ONNX Runtime in-process, interleaved with every server at concurrency 1
        onnx_pipe, floor_settings = floor_pipeline(floor_repo, args.threads)
        ab_prompts, ab_seeds, ab_offset = run_prompts(args.prompts, prompts, seeds, len(args.concurrency),
                                                      args.requests, args.warmup)
        ab = bench_overhead(urls, args.protocol, onnx_pipe, ab_prompts, ab_seeds, guidance, args.requests,
                            args.warmup, args.ab_block, args.max_seconds, ab_offset, metrics_urls)
        server_meta = server_metadata(next(iter(urls.values())), args.protocol)
        server_settings = {m: server_session_settings(floor_repo, m) for m in floor_settings}
    del onnx_pipe
    floor = ab.pop("floor")
    ab = {"block": args.ab_block, "floor": floor, "served": ab}
    cache_hits = _cache_warnings(args.prompts, servers, ab)
    warnings += [w for ws in cache_hits.values() for w in ws]
    log(f"[bench] compute floor: p50 {floor['p50_ms']:.1f} ms; served at concurrency 1 in the same interleaved "
        "run: " + ", ".join(f"{v} p50 {r['p50_ms']:.1f} ms" + _hit_rate_note(r.get("text_cache"))
                            for v, r in ab["served"].items()))
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
                   "prompts": (f"boot_serve.prompts.distinct_example_prompts(n, {PROMPT_OFFSET}), each followed by "
                               f"the run's tag {args.run_tag}" if args.prompts == "unique" else
                               f"boot_serve.prompts.example_prompts(n, {PROMPT_OFFSET})") + f", seeds {FIRST_SEED}+i",
                   "prompt_mode": args.prompts},
        "hardware": hw, "versions": versions(), "server": server_meta,
        "threads": threads, "load_average": {"start": load_start, "end": load_average()}, "warnings": warnings,
        "headlines": headlines(servers, ab, student, teacher, args.teacher_steps, rounds["ratios"] if rounds else ()),
        "servers": servers, "overhead_ab": ab, "pipelines": pipelines, "teacher_rounds": rounds,
    }
    for row in report["headlines"]:  # a floor paying the text encoder against requests that skipped it
        if row["metric"] == "serving_overhead_c1" and cache_hits.get(row["variant"]):
            row["met"] = None
            row["basis"] += "; not comparable: requests hit the text-state cache (see the warnings)"
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


def _cache_warnings(mode: str, servers: list[dict], ab: dict) -> dict[str, list[str]]:
    """With --prompts unique every request must miss the text-state cache (the floor runs the text encoder for
    each): per variant, a warning for each run where the server counted hits, since that comparison is not like
    with like."""
    out: dict[str, list[str]] = {}
    if mode != "unique":
        return out
    runs = [(s["variant"], f"concurrency {r['concurrency']}", r.get("text_cache"))
            for s in servers for r in s["served"]]
    runs += [(v, "the interleaved run", r.get("text_cache")) for v, r in ab["served"].items()]
    for variant, where, counts in runs:
        if counts and counts["hits"]:
            out.setdefault(variant, []).append(
                f"--prompts unique, yet {variant} answered {counts['hits']} requests of {where} from its text-state "
                "cache: those skipped the text encoder the floor runs, so its overhead is understated")
    return out


def _hit_rate_note(text_cache: dict | None) -> str:
    return f" (text-cache hit rate {text_cache['hit_rate']:.2f})" if text_cache else ""


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
    if "--in-process" in (sys.argv[1:] if argv is None else argv):  # the in-process benchmark (no server)
        from boot_serve.bench.inprocess import main as in_process

        return in_process(argv)
    from boot_serve.bench.stats import MetricsError
    from boot_serve.client import ClientError
    from boot_serve.triton_configs import RepositoryError
    from boot_serve.triton_process import ServerError

    args = parse_args(argv)
    try:
        report = run(args, argv)
    except (BenchError, MetricsError, ClientError, FileNotFoundError, ServerError, RepositoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "bench.md").read_text())
    print(f"written: {args.out}/bench.json, bench.md, bench.png")
    return 0 if all(r["errors"] == 0 for s in report["servers"] for r in s["served"]) else 1


from boot_serve.bench.loadgen import *  # noqa: E402,F401,F403
from boot_serve.bench.machine import *  # noqa: E402,F401,F403
from boot_serve.bench.measure import *  # noqa: E402,F401,F403
from boot_serve.bench.report import *  # noqa: E402,F401,F403
from boot_serve.bench.servers import *  # noqa: E402,F401,F403
from boot_serve.bench.stats import *  # noqa: E402,F401,F403
