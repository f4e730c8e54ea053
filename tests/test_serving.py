"""Serving against a real tritonserver (conftest.py): a tiny student exported with `python -m boot_serve.export`.
- images equal OnnxPipeline's for the same (prompt, seed, guidance), within 2/255, over HTTP and gRPC;
- concurrent requests are batched (Triton's statistics: fewer executions than inferences);
- every kind of bad input gets its own error, and the server keeps serving after each;
- a bad request batched with good ones fails alone;
- the client, its CLI, the metrics endpoint, the served model as an evaluation generator.
`-m slow`: 64 concurrent requests from 8 clients (prints latency and batch numbers).
(The model repository's configs and the serve launcher: test_serving_repository.py.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from boot_serve import triton_repo
from boot_serve.client import Client, RequestError, ServerUnavailableError
from boot_serve.triton_process import find_free_port

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 2  # uint8 levels
PROMPTS = ["a red circle", "a large blue square at the top left", "a green triangle left of a yellow circle",
           "a small white square and a purple triangle"]
SEEDS = [0, 1, 2**63 - 1, 12345]


# --------------------------------------------------------------------------------------------
# The served model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(exported_repository):
    from boot_serve.onnx_pipeline import OnnxPipeline

    return OnnxPipeline.from_pretrained(exported_repository, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def client(triton_server):
    with Client(triton_server.http_url, "http", timeout=60) as c:
        yield c


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _max_diff(a, b) -> int:
    return int(np.abs(_arrays(a).astype(np.int16) - _arrays(b).astype(np.int16)).max())


def assert_still_serving(client: Client, reference) -> None:
    images = client.generate(PROMPTS[:1], SEEDS[:1])
    assert _max_diff(images, reference(PROMPTS[:1], SEEDS[:1])) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("guidance", [None, 1.0, 4.5])
def test_server_images_equal_onnx_pipeline(triton_server, reference, protocol, guidance):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with Client(url, protocol) as c:
        served = c.generate(PROMPTS, SEEDS, guidance)
    expected = reference(PROMPTS, SEEDS, guidance)
    assert served[0].size == expected[0].size == (16, 16) and served[0].mode == "RGB"
    assert _max_diff(served, expected) <= TOLERANCE


def test_guidance_and_seed_change_the_image(client):
    """The equality test above would pass for a server that ignores GUIDANCE_SCALE or SEED
    only if they had no effect: check that they do."""
    base, other_w, other_seed = (_arrays(client.generate(PROMPTS[:1], [s], w))
                                 for s, w in ((3, 1.0), (3, 5.0), (4, 1.0)))
    assert np.abs(base.astype(int) - other_w).max() > TOLERANCE
    assert np.abs(base.astype(int) - other_seed).max() > TOLERANCE


def test_image_does_not_depend_on_batch(client, reference):
    alone = client.generate(PROMPTS[2:3], SEEDS[2:3], 2.0)
    batched = client.generate(PROMPTS, SEEDS, 2.0)[2:3]
    many = client.generate_many(PROMPTS, SEEDS, 2.0)[2:3]
    assert _max_diff(alone, batched) <= 1 and _max_diff(alone, many) <= 1


def _stats(client: Client, model: str) -> tuple[int, int]:
    s = client.statistics(model)["model_stats"][0]
    return int(s.get("execution_count", 0)), int(s.get("inference_count", 0))


def _counts_since(client: Client, before: dict, inferences: int, timeout: float = 10.0) -> dict:
    """(executions, inferences) of each model since `before`, once all `inferences` are counted
    (a model records its statistics just after it has sent its responses)."""
    deadline = time.monotonic() + timeout
    while True:
        now = {m: _stats(client, m) for m in before}
        delta = {m: (now[m][0] - before[m][0], now[m][1] - before[m][1]) for m in before}
        if all(d[1] >= inferences for d in delta.values()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def _onehop(server) -> bool:
    return triton_repo.served_variant(server.repository) == triton_repo.ONEHOP


def _batching(server) -> tuple[str, ...]:
    """The models of the variant `server` serves that batch requests (boot_txt2img alone in cpu-onehop)."""
    return triton_repo.batching_models(triton_repo.served_variant(server.repository))


def test_concurrent_requests_are_batched(triton_server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    seeds = list(range(100, 132))
    with Client(triton_server.grpc_url, "grpc", concurrency=32, operator_key=triton_server.operator_key) as c:
        before = {m: _stats(c, m) for m in _batching(triton_server)}
        images = c.generate_many(prompts, seeds)
        counts = _counts_since(c, before, 32)
    assert _max_diff(images, reference(prompts, seeds)) <= TOLERANCE
    for m, (executions, inferences) in counts.items():
        assert inferences == 32
        assert executions < inferences, f"{m}: {executions} executions for {inferences} inferences: no batching"


# --- bad input: each one a clear per-request error; the server keeps serving ----------------
BAD_PROMPTS = {
    "empty": ("", "PROMPT is empty"),
    "whitespace": ("   \n", "PROMPT is empty"),
    # No content: answered as the empty prompt (boot.contract.has_content, copied into triton_model.py)
    "nul": ("\x00\x00\x00", "PROMPT is empty; send a non-empty caption"),
    "zero_width": ("\u200b\u200c\u200d\u2060", "PROMPT is empty; send a non-empty caption"),
    "bom": ("\ufeff", "PROMPT is empty; send a non-empty caption"),
    "soft_hyphen": ("\u00ad", "PROMPT is empty; send a non-empty caption"),
    "combining_mark_alone": ("\u0301", "PROMPT is empty; send a non-empty caption"),
    "hangul_filler": ("\u3164\u115f\u1160", "PROMPT is empty; send a non-empty caption"),
    "braille_blank": ("\u2800", "PROMPT is empty; send a non-empty caption"),
    # Content for the character rule, the empty prompt's ids for the tokenizer (MiniLM drops U+FFFD)
    "reads_as_empty": ("\ufffd", "PROMPT is empty; send a non-empty caption"),
    "too_long": ("a red circle " * 10, "tokens long .* at most 16. Over-long prompts are rejected, not truncated"),
    "not_utf8": (b"a red \xff\xfe circle", "PROMPT is not valid UTF-8"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=list(BAD_PROMPTS))
def test_bad_prompt(client, reference, case):
    prompt, message = BAD_PROMPTS[case]
    with pytest.raises(RequestError, match=message) as err:
        client.generate([prompt], [0])
    assert err.value.status == "400"
    assert_still_serving(client, reference)


def test_invisible_characters_around_content_are_served(client, reference):
    prompts = ["\u200ba red\u00ad circle\ufeff", "\u3164円"]
    assert _max_diff(client.generate(prompts, [0, 1]), reference(prompts, [0, 1])) <= TOLERANCE


def test_negative_seed(client, reference):
    with pytest.raises(RequestError, match=r"SEED is -1; seeds are integers in \[0, 2\*\*63 - 1\]"):
        client.generate(PROMPTS[:1], [-1])
    assert_still_serving(client, reference)


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -math.inf, 0.5, 5.5], ids=str)
def test_bad_guidance(client, reference, guidance):
    message = "must be a finite number" if not math.isfinite(guidance) else r"outside this student's range \[1.0, 5.0\]"
    with pytest.raises(RequestError, match=message):
        client.generate(PROMPTS[:1], [0], guidance)
    assert_still_serving(client, reference)


def _raw(url: str, inputs: list[tuple[str, np.ndarray, str]]):
    """A request with exactly these tensors (name, array, Triton datatype), over HTTP."""
    import tritonclient.http as http

    with http.InferenceServerClient(url) as c:
        tensors = []
        for name, array, datatype in inputs:
            t = http.InferInput(name, list(array.shape), datatype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        return c.infer("boot_txt2img", tensors).as_numpy("IMAGE")


def _prompt(n=1):
    return np.array([[b"a red circle"]] * n, dtype=object)


def _seed(n=1, dtype=np.int64):
    return np.arange(n, dtype=dtype).reshape(n, 1)


RAW_CASES = {  # Triton itself rejects these against the ensemble's config, before any model runs
    "seed_uint64_over_int64": ([("PROMPT", _prompt(), "BYTES"), ("SEED", np.array([[2**63]], np.uint64), "UINT64")],
                               "input 'SEED' data-type is 'UINT64', but model 'boot_txt2img' expects 'INT64'"),
    "seed_float": ([("PROMPT", _prompt(), "BYTES"), ("SEED", np.array([[1.5]], np.float32), "FP32")],
                   "input 'SEED' data-type is 'FP32'"),
    "guidance_fp64": ([("PROMPT", _prompt(), "BYTES"), ("SEED", _seed(), "INT64"),
                       ("GUIDANCE_SCALE", np.array([[2.0]], np.float64), "FP64")],
                      "input 'GUIDANCE_SCALE' data-type is 'FP64', but model 'boot_txt2img' expects 'FP32'"),
    "prompt_int": ([("PROMPT", np.array([[7]], np.int32), "INT32"), ("SEED", _seed(), "INT64")],
                   "input 'PROMPT' data-type is 'INT32', but model 'boot_txt2img' expects 'BYTES'"),
    "prompt_two_per_row": ([("PROMPT", np.array([[b"a", b"b"]], dtype=object), "BYTES"), ("SEED", _seed(), "INT64")],
                           r"unexpected shape for input 'PROMPT' .* Expected \[-1,1\], got \[1,2\]"),
    "seed_no_batch_axis": ([("PROMPT", _prompt(), "BYTES"), ("SEED", np.array([0], np.int64), "INT64")],
                           r"unexpected shape for input 'SEED' .* Expected \[-1,1\], got \[1\]"),
    "batch_sizes_differ": ([("PROMPT", _prompt(2), "BYTES"), ("SEED", _seed(3), "INT64")],
                           "input 'PROMPT' batch size does not match other inputs"),
    "missing_seed": ([("PROMPT", _prompt(), "BYTES")], r"missing required input\(s\) \['SEED'\]"),
    "unknown_input": ([("PROMPT", _prompt(), "BYTES"), ("SEED", _seed(), "INT64"),
                       ("STEPS", np.array([[4]], np.int64), "INT64")], "unexpected inference input 'STEPS'"),
    "batch_over_max": ([("PROMPT", _prompt(9), "BYTES"), ("SEED", _seed(9), "INT64")],
                       "batch-size must be <= 8 for 'boot_txt2img'"),
}


@pytest.mark.parametrize("case", RAW_CASES, ids=list(RAW_CASES))
def test_malformed_request(triton_server, client, reference, case):
    from tritonclient.utils import InferenceServerException

    inputs, message = RAW_CASES[case]
    with pytest.raises(InferenceServerException, match=message) as err:
        _raw(triton_server.http_url, inputs)
    assert err.value.status() == "400"
    assert_still_serving(client, reference)


def test_largest_batch_is_accepted_and_the_client_splits_bigger_ones(client, reference):
    for n in (8, 11):  # one request of 8 prompts; requests of 8 + 3
        prompts, seeds = [PROMPTS[i % 4] for i in range(n)], list(range(n))
        assert _max_diff(client.generate(prompts, seeds), reference(prompts, seeds)) <= TOLERANCE


def test_one_bad_prompt_rejects_its_multi_prompt_request(client, reference):
    with pytest.raises(RequestError, match=r"PROMPT\[1\] is empty") as err:
        client.generate(["a red circle", " ", "a blue square"], [0, 1, 2])
    assert err.value.index == 0
    with pytest.raises(RequestError, match=r"SEED\[2\] is -5"):
        client.generate(["a red circle"] * 3, [0, 1, -5])
    assert_still_serving(client, reference)


def test_bad_request_fails_alone_among_concurrent_good_ones(triton_server, reference):
    """Good and bad requests in flight together (so in the same dynamic batches): each bad one
    gets its own error, each good one its correct image."""
    bad = {3: "", 7: "x " * 40, 11: b"\xc3\x28"}
    prompts = [bad.get(i, PROMPTS[i % 4]) for i in range(16)]
    seeds = list(range(200, 216))
    with Client(triton_server.grpc_url, "grpc", concurrency=16, operator_key=triton_server.operator_key) as c:
        first = _batching(triton_server)[0] if _onehop(triton_server) else "preprocess"  # where requests are checked
        before = {first: _stats(c, first)}
        results = c.generate_many(prompts, seeds, return_errors=True)
        ((executions, inferences),) = _counts_since(c, before, 16).values()
    assert inferences == 16 and executions < inferences, "the requests were not batched together"
    for i, r in enumerate(results):
        if i in bad:
            assert isinstance(r, RequestError) and r.index == i and "PROMPT" in str(r)
        else:
            assert _max_diff([r], reference([prompts[i]], [seeds[i]])) <= TOLERANCE


def test_mixed_good_and_bad_traffic_never_hangs(triton_server):
    """Regression: with the checks split over two parallel ensemble steps, Triton 2.51 hung a
    rejected request forever (or fed the other step freed memory) within 3 to 62 such rounds."""
    with Client(triton_server.grpc_url, "grpc", concurrency=16, timeout=30) as c:
        for round_ in range(25):
            bad = {3: "", 7: "x " * 40, 11: b"\xc3\x28"}
            prompts = [bad.get(i, PROMPTS[i % 4]) for i in range(16)]
            seeds = [-1 if i in (5, 13) else i for i in range(16)]
            results = c.generate_many(prompts, seeds, 4.0 if round_ % 2 else None, return_errors=True)
            for i, r in enumerate(results):
                assert isinstance(r, RequestError) == (i in bad or i in (5, 13)), (round_, i, r)


def test_client_reports_an_unreachable_server():
    port = find_free_port()
    for protocol in ("http", "grpc"):
        with pytest.raises(ServerUnavailableError, match="no Triton server answers"):
            Client(f"127.0.0.1:{port}", protocol, timeout=5).generate(["a red circle"], [0])
        with pytest.raises(ConnectionError):
            Client(f"127.0.0.1:{port}", protocol, timeout=5).generate_many(["a red circle"], [0])


def test_client_rejects_unknown_model(triton_server):
    with pytest.raises(ServerUnavailableError, match="not loaded or not ready"):
        Client(triton_server.http_url, model="nope").generate(["a red circle"], [0])


def test_client_cli(triton_server, reference, tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "boot_serve.client", "a red circle", "--seed", "5", "--out", str(out),
                           "--url", triton_server.grpc_url, "--protocol", "grpc", "--guidance", "2.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert _max_diff([Image.open(out).convert("RGB")], reference(["a red circle"], [5], 2.5)) <= TOLERANCE
    proc = subprocess.run([sys.executable, "-m", "boot_serve.client", "", "--url", triton_server.http_url,
                           "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "PROMPT is empty" in proc.stderr


def test_metrics_endpoint(triton_server):
    import urllib.request

    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="boot_txt2img"' in text


# --------------------------------------------------------------------------------------------
# Load: 64 concurrent requests from 8 clients (slow; prints the numbers)
# --------------------------------------------------------------------------------------------
def run_load(url: str, models: tuple[str, ...], operator_key: str, clients: int = 8, per_client: int = 8) -> dict:
    """`clients` gRPC clients (one thread each), each with `per_client` requests in flight at
    once (async_infer); per-request latency from send to callback."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one_client(k: int) -> None:
        done = threading.Semaphore(0)
        with grpcclient.InferenceServerClient(url) as c:
            for i in range(per_client):
                seed = k * per_client + i
                prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
                prompt.set_data_from_numpy(np.array([[PROMPTS[seed % 4].encode()]], dtype=object))
                seed_in = grpcclient.InferInput("SEED", [1, 1], "INT64")
                seed_in.set_data_from_numpy(np.array([[seed]], dtype=np.int64))

                def callback(result, error, start=time.perf_counter()):
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        if error is not None:
                            failures.append(str(error))
                    done.release()

                c.async_infer("boot_txt2img", [prompt, seed_in], callback)
            for _ in range(per_client):
                done.acquire()

    with Client(url, "grpc", operator_key=operator_key) as c:  # the key opens Triton's statistics
        c.generate(PROMPTS, SEEDS)  # warm-up
        before = {m: _stats(c, m) for m in models}
        threads = [threading.Thread(target=one_client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        counts = _counts_since(c, before, clients * per_client)
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "failed": len(failures), "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 1),
            "latency_ms": {q: round(float(np.percentile(ms, int(q[1:])))) for q in ("p50", "p90", "p99")},
            "executions/inferences": {m: f"{e}/{i}" for m, (e, i) in counts.items()},
            "errors": failures[:3]}


@pytest.mark.slow
def test_64_concurrent_requests_from_8_clients(triton_server):
    result = run_load(triton_server.grpc_url, _batching(triton_server), triton_server.operator_key)
    print(f"\n{json.dumps(result)}")
    assert result["requests"] == 64 and result["failed"] == 0, result["errors"]
    for m in _batching(triton_server):
        executions, inferences = map(int, result["executions/inferences"][m].split("/"))
        assert inferences == 64 and executions < inferences, m


def test_served_model_as_an_evaluation_generator(triton_server, reference):
    """distill.evaluate --url: the served model judged like any generator, PSNR vs the in-process one."""
    from distill.evaluate import ServedGenerator, evaluate
    from shapes_world import world

    captions = world.sample_captions(12, 3, "eval")
    seeds = list(range(100, 112))
    gen = ServedGenerator(triton_server.http_url)
    res, images = evaluate(gen, captions, seeds, None, reference(captions, seeds))
    assert (res.name, res.nfe, res.n, len(images)) == ("served-1", 1, 12, 12)
    assert res.psnr_vs_reference > 40  # within 2/255 per pixel, i.e. > 42 dB
