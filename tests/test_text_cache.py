"""The text-state cache of the served model (boot_serve/triton_text_cache.py, copied beside triton_model.py):
a repeated prompt skips the text encoder and gets the very states, hence the very image, that its first
request got.

In-process (the model's own classes, no server):
- a hit's states are bit-identical to the miss's and to the text encoder's, and read-only;
- the table stays within its byte bound (its own accounting and the memory it really holds), evicts the
  least recently used entry first, and keeps nothing bigger than the bound;
- 16 threads sharing one model with overlapping prompts get the images of a model without the cache;
- text_cache_bytes: its default is one number in both files, 0 turns the cache off, a bad value is refused.
On real tritonservers, both CPU variants (cpu-onehop: two instances, each with its own cache;
cpu-ensemble: the cache in text_encoder), with a bound of a few prompts, and a third server with the
cache off by config:
- a repeated prompt is a hit (the server's boot_text_cache_* metrics) and its image bytes are those of
  the server without the cache;
- many distinct prompts never take an instance's cache over its bound, and evict;
- 16 concurrent clients with overlapping prompts get the images of the server without the cache;
- with text_cache_bytes 0 the server has no cache and no cache metrics.
The bench's hit rate: `--prompts unique` gives no prompt twice (every request a miss).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from boot_serve import triton_model, triton_repo, triton_text_cache
from boot_serve.bench.stats import parse_text_cache
from boot_serve.client import Client
from boot_serve.prompts import distinct_example_prompts

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = distinct_example_prompts(200, 500)  # different shapes captions


def _entry_bytes(manifest: dict) -> int:
    """What one prompt costs the cache of a repository without a second tokenizer."""
    L, D = manifest["max_length"], manifest["hidden_size"]
    return L * D * 4 + L * 8 + triton_text_cache.TextStateCache.ENTRY_OVERHEAD


@pytest.fixture(scope="module")
def manifest(exported_repository) -> dict:
    return json.loads((exported_repository / "manifest.json").read_text())


@pytest.fixture(scope="module")
def bound(manifest) -> int:
    """Room for four prompts, not five."""
    return 4 * _entry_bytes(manifest) + 100


def _onehop(repository: Path, cache_bytes: int):
    return triton_model.OneHop(repository, {"text_cache_bytes": str(cache_bytes), "intra_op_thread_count": "1"})


def _request(prompt: str, seed: int):
    return ([prompt.encode()], np.array([seed], dtype=np.int64), None)


# --------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------
def test_hit_states_are_bit_identical_and_read_only(exported_repository, manifest):
    session = triton_model.session(exported_repository / manifest["graphs"]["text_encoder"]["path"], {})
    encoder = triton_text_cache.TextEncoder(session, ["text_states"], 1 << 20)
    pre = triton_model.Preprocessor(exported_repository, manifest)
    ids = pre(PROMPTS[:3], [0, 1, 2])["input_ids"]
    direct = session.run(["text_states"], {"input_ids": ids})[0]
    miss = encoder({"input_ids": ids})["text_states"]
    hit = encoder({"input_ids": ids})["text_states"]
    mixed = encoder({"input_ids": ids[[2, 0]]})["text_states"]  # a batch of hits in another order
    assert np.array_equal(miss, direct) and np.array_equal(hit, direct) and np.array_equal(mixed, direct[[2, 0]])
    assert encoder.cache.stats()["hits"] == 5 and encoder.cache.stats()["misses"] == 3
    hit[:] = 0  # the batch handed out is the caller's own
    assert np.array_equal(encoder({"input_ids": ids})["text_states"], direct)
    for key in (b"".join([row.tobytes()]) for row in ids):
        (states,) = encoder.cache.get(key)
        assert not states.flags.writeable and states.base is None  # owned: keeps no batch alive
        with pytest.raises(ValueError):
            states[0, 0] = 1.0
    # A prompt twice in one batch runs once; both rows get its states.
    fresh = triton_text_cache.TextEncoder(session, ["text_states"], 1 << 20)
    twice = fresh({"input_ids": ids[[1, 1]]})["text_states"]
    assert np.array_equal(twice, direct[[1, 1]]) and fresh.cache.stats()["misses"] == 1


# 500 rows of 4,000 bytes into a 200 kB cache; prints [bytes held, evictions, entries kept, bound]. Held: the cache's
# own allocations (its copies of the arrays, its table) plus the keys it keeps, which the caller allocated.
HELD_BY_THE_CACHE = """
import json, sys, tracemalloc
import numpy as np
from boot_serve import triton_text_cache
tracemalloc.start()
before = tracemalloc.take_snapshot()
big = triton_text_cache.TextStateCache(200_000)
for i in range(500):
    big.put(i.to_bytes(8, "little"), [np.full(1000, i, np.float32)])
    assert big.bytes <= big.max_bytes
after = tracemalloc.take_snapshot()
tracemalloc.stop()
held = sum(d.size_diff for d in after.compare_to(before, "filename")
           if d.traceback[0].filename == triton_text_cache.__file__) + len(big) * sys.getsizeof(bytes(8))
print(json.dumps([held, big.stats()["evictions"], len(big), big.max_bytes]))
"""


def test_cache_stays_within_its_bound_and_evicts_the_least_recently_used():
    row = np.arange(1000, dtype=np.float32)  # 4000 bytes
    size = row.nbytes + 8 + triton_text_cache.TextStateCache.ENTRY_OVERHEAD
    cache = triton_text_cache.TextStateCache(3 * size + 10)
    for k in (b"00000000", b"11111111", b"22222222"):
        cache.put(k, [row])
    assert cache.get(b"00000000") is not None  # now the most recently used
    cache.put(b"33333333", [row])
    assert cache.get(b"11111111") is None and cache.get(b"00000000") is not None
    assert len(cache) == 3 and cache.stats()["evictions"] == 1 and cache.bytes <= cache.max_bytes
    cache.put(b"44444444", [np.zeros(4000, np.float32)])  # bigger than the whole bound: not kept
    assert cache.get(b"44444444") is None and len(cache) == 3
    # The memory the table really holds stays within the bound it counts against, measured in an interpreter of
    # its own: tracemalloc traces every thread, and in the suite other threads (servers, channels, models of
    # earlier tests) allocate meanwhile.
    held, evictions, kept, max_bytes = json.loads(subprocess.run(
        [sys.executable, "-c", HELD_BY_THE_CACHE], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert evictions == 500 - kept and held <= max_bytes, held
    with pytest.raises(ValueError):
        triton_text_cache.TextStateCache(-1)


def test_threads_sharing_one_model_get_the_uncached_images(exported_repository, bound):
    cached, plain = _onehop(exported_repository, bound), _onehop(exported_repository, 0)
    requests = [(PROMPTS[10 + i % 6], 100 + i) for i in range(64)]  # 6 prompts, room for 4: evictions too
    expected = {r: plain([_request(*r)])[0] for r in requests}
    got: dict = {}
    errors: list = []

    def client(k: int) -> None:
        try:
            for r in requests[k::16]:
                got[r] = cached([_request(*r)])[0]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(got[r], expected[r]) for r in requests)
    stats = cached.text_encoder.cache.stats()
    assert stats["hits"] + stats["misses"] == 64 and stats["hits"] > 0 and stats["bytes"] <= bound


def test_text_cache_bytes_parameter(exported_repository):
    assert triton_repo.TEXT_CACHE_BYTES == triton_text_cache.DEFAULT_TEXT_CACHE_BYTES
    assert triton_text_cache.text_cache_bytes({}) == triton_text_cache.DEFAULT_TEXT_CACHE_BYTES
    assert triton_text_cache.text_cache_bytes({"text_cache_bytes": "0"}) == 0
    for bad in ("-1", "64MiB", "1.5", ""):
        with pytest.raises(RuntimeError, match="text_cache_bytes"):
            triton_text_cache.text_cache_bytes({"text_cache_bytes": bad})
    assert _onehop(exported_repository, 0).text_encoder.cache is None
    # The configs carry it where the text encoder runs, in both CPU variants (cpu-onehop also writes the
    # unloaded text_encoder config), and nowhere else.
    for variant, models in (("cpu-onehop", {"boot_txt2img", "text_encoder"}), ("cpu-ensemble", {"text_encoder"})):
        configs = triton_repo.model_configs(triton_repo.SHAPES_MANIFEST, variant, text_cache_bytes=12345)
        assert {name for name, c in configs.items() if "text_cache_bytes" in c.parameters} == models
        assert {configs[m].parameters["text_cache_bytes"].string_value for m in models} == {"12345"}
    for variant in ("gpu",):  # the onnxruntime backend's text_encoder: no Python model, no cache
        configs = triton_repo.model_configs(triton_repo.SHAPES_MANIFEST, variant)
        assert not any("text_cache_bytes" in c.parameters for c in configs.values())
    with pytest.raises(ValueError, match="text_cache_bytes"):
        triton_repo.model_configs(triton_repo.SHAPES_MANIFEST, "cpu", text_cache_bytes=-1)


def test_parse_text_cache_sums_instances():
    text = ("# TYPE boot_text_cache_hits counter\n"
            'boot_text_cache_hits{instance="m_0_0",model="m",version="1"} 3\n'
            'boot_text_cache_hits{instance="m_0_1",model="m",version="1"} 4\n'
            'boot_text_cache_misses{instance="m_0_0",model="m",version="1"} 2\n'
            'boot_text_cache_bytes{instance="m_0_0",model="m",version="1"} 99\n'
            'nv_inference_count{model="m",version="1"} 9\n')
    assert parse_text_cache(text) == {"hits": 7.0, "misses": 2.0}


# --------------------------------------------------------------------------------------------
# Real tritonservers
# --------------------------------------------------------------------------------------------
SERVED = {"cpu-onehop": "boot_txt2img", "cpu-ensemble": "text_encoder"}  # the model that holds the cache


def _server(exported_repository, tmp_path_factory, variant: str, cache_bytes: int):
    from boot_serve.triton_server import TritonServer

    repo = tmp_path_factory.mktemp(f"{variant}-cache{cache_bytes}") / "model_repository"
    shutil.copytree(exported_repository, repo)
    triton_repo.write_configs(repo, variant, text_cache_bytes=cache_bytes)
    return TritonServer(repo, exit_timeout=5).start()


@pytest.fixture(scope="module")
def servers(exported_repository, tmp_path_factory, bound):
    """Both CPU variants with a cache of four prompts, and cpu-onehop with the cache off."""
    started = {}
    try:
        for variant in SERVED:
            started[variant] = _server(exported_repository, tmp_path_factory, variant, bound)
        started["off"] = _server(exported_repository, tmp_path_factory, "cpu-onehop", 0)
        yield started
    finally:
        for server in started.values():
            server.stop()


def _metrics(server) -> dict[tuple[str, str], float]:
    """(metric, instance) -> value of the server's boot_text_cache_* metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("boot_text_cache_"):
            name, _, rest = line.partition("{")
            labels, _, value = rest.partition("}")
            instance = dict(kv.split("=", 1) for kv in labels.split(","))["instance"].strip('"')
            out[(name, instance)] = float(value)
    return out


def _total(metrics: dict, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == f"boot_text_cache_{name}")


def _images(server, prompts, seeds, concurrency: int = 1) -> np.ndarray:
    with Client(server.grpc_url, "grpc", concurrency=concurrency) as c:
        images = c.generate_many(prompts, seeds) if concurrency > 1 else \
            [c.generate([p], [s])[0] for p, s in zip(prompts, seeds)]
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("variant", SERVED)
def test_repeated_prompt_is_a_hit_with_the_same_image(servers, variant):
    server = servers[variant]
    prompt = PROMPTS[40 + list(SERVED).index(variant)]
    before = _metrics(server)
    served = _images(server, [prompt] * 6, [7] * 6)
    after = _metrics(server)
    hits, misses = (_total(after, k) - _total(before, k) for k in ("hits", "misses"))
    instances = 2 if variant == "cpu-onehop" else 1  # each instance misses once, at most
    assert hits + misses == 6 and 1 <= misses <= instances and hits >= 6 - instances
    uncached = _images(servers["off"], [prompt], [7])
    assert all(np.array_equal(image, uncached[0]) for image in served)


@pytest.mark.parametrize("variant", SERVED)
def test_many_distinct_prompts_never_exceed_the_bound(servers, variant, bound, manifest):
    server = servers[variant]
    prompts = PROMPTS[60 + 30 * list(SERVED).index(variant):][:30]
    with Client(server.http_url, "http") as c:
        for i in range(0, len(prompts), 3):
            c.generate(prompts[i:i + 3], [i, i + 1, i + 2])  # a request of three prompts
            c.generate(prompts[i:i + 1], [i])  # and one of them again
            metrics = _metrics(server)
            for (name, instance), value in metrics.items():
                if name == "boot_text_cache_bytes":
                    assert value <= bound, (instance, value)
                if name == "boot_text_cache_entries":
                    assert value <= bound // _entry_bytes(manifest), (instance, value)
    assert _total(metrics, "evictions") > 0
    assert {instance for (name, instance) in metrics if name == "boot_text_cache_bytes"} <= {
        f"{SERVED[variant]}_{k}_0" for k in range(2)}  # one instance group per copy (triton_configs._cpu_copies)


@pytest.mark.parametrize("variant", SERVED)
def test_concurrent_clients_with_overlapping_prompts_get_uncached_images(servers, variant):
    prompts = [PROMPTS[120 + i % 6] for i in range(48)]  # 6 prompts over 48 requests, room for 4 per instance
    seeds = [1000 + i for i in range(48)]
    before = _metrics(servers[variant])
    for _ in range(2):
        cached = _images(servers[variant], prompts, seeds, concurrency=16)
        uncached = _images(servers["off"], prompts, seeds, concurrency=16)
        differ = [i for i in range(48) if not np.array_equal(cached[i], uncached[i])]
        assert differ == [], f"{len(differ)} images differ from the uncached server's"
    after = _metrics(servers[variant])
    assert _total(after, "hits") - _total(before, "hits") > 0


def test_one_copy_serves_at_low_load_and_both_under_load(servers):
    """cpu-onehop's two copies: requests one at a time all go to the preferred copy (its weights stay in the CPU's
    caches), concurrent ones reach the second too. The text-state cache's misses, labelled by instance, show
    which copy ran each new prompt."""
    server = servers["cpu-onehop"]  # prompts no other test sends: each one a miss, counted by the copy that ran it
    misses = lambda m: {i: v for (n, i), v in m.items() if n == "boot_text_cache_misses"}  # noqa: E731
    before = misses(_metrics(server))
    _images(server, PROMPTS[130:150], list(range(20)))
    sequential = {i: v - before.get(i, 0.0) for i, v in misses(_metrics(server)).items()}
    assert sorted(sequential.values(), reverse=True)[:2] in ([20.0, 0.0], [20.0]), sequential
    before = misses(_metrics(server))
    _images(server, PROMPTS[150:198], list(range(48)), concurrency=16)
    loaded = {i: v - before.get(i, 0.0) for i, v in misses(_metrics(server)).items()}
    assert sum(loaded.values()) == 48 and sorted(loaded) == ["boot_txt2img_0_0", "boot_txt2img_1_0"], loaded
    assert min(loaded.values()) > 0, loaded


def test_cache_off_by_config(servers):
    server = servers["off"]
    config = triton_repo.parse_config((server.repository / "boot_txt2img" / "config.pbtxt").read_text())
    assert config.parameters["text_cache_bytes"].string_value == "0"
    images = _images(server, [PROMPTS[45]] * 3, [5] * 3)
    assert all(np.array_equal(im, images[0]) for im in images)
    assert _metrics(server) == {}  # no cache, no cache metrics


def test_bench_reports_the_hit_rate_and_unique_prompts_all_miss(exported_repository, tmp_path):
    from boot_serve import bench

    out = tmp_path / "report"
    code = bench.main(["--variants", ",".join(SERVED), "--concurrency", "1,2", "--requests", "5", "--warmup", "1",
                       "--prompts", "unique", "--repository", str(exported_repository), "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    assert code == 0 and report["config"]["prompt_mode"] == "unique"
    for server in report["servers"]:
        runs = [*server["served"], report["overhead_ab"]["served"][server["variant"]]]
        assert [r["text_cache"]["hits"] for r in runs] == [0, 0, 0]
        assert [r["text_cache"]["misses"] for r in runs] == [5, 5, 5]
    assert "text-cache hit rate" in (out / "bench.md").read_text() and "0.00 (0/5)" in (out / "bench.md").read_text()


def test_bench_unique_prompts_miss_on_a_server_that_served_them_before(exported_repository, tmp_path_factory):
    """A second `--prompts unique` run against the same server gets prompts of its own (the run's tag); with
    the tag repeated, its hits are reported and the overhead headline is not judged."""
    from boot_serve import bench

    server = _server(exported_repository, tmp_path_factory, "cpu-onehop", 64 << 20)
    key = tmp_path_factory.mktemp("key") / "operator-key"
    key.write_text(server.operator_key)
    try:
        def run(out, *tag):
            code = bench.main(["--url", server.http_url, "--metrics-url", server.metrics_url, "--operator-key-file",
                               str(key), "--concurrency", "1", "--requests", "5", "--warmup", "1", "--prompts",
                               "unique", "--repository", str(server.repository), "--out", str(out), *tag])
            assert code == 0
            return json.loads((out / "bench.json").read_text())

        out = tmp_path_factory.mktemp("bench")
        reports = [run(out / "a", "--run-tag", "123456"), run(out / "b"), run(out / "c", "--run-tag", "123456")]
    finally:
        server.stop()
    hits = [[*(r["text_cache"]["hits"] for r in report["servers"][0]["served"]),
             report["overhead_ab"]["served"]["cpu-onehop"]["text_cache"]["hits"]] for report in reports]
    assert hits == [[0, 0], [0, 0], [5, 5]]  # the measured requests of each run (run c: every prompt of run a again)
    assert "123456" in reports[0]["config"]["prompts"] and "123456" not in reports[1]["config"]["prompts"]
    overhead = [[h for h in r["headlines"] if h["metric"] == "serving_overhead_c1"][0] for r in reports]
    assert overhead[0]["met"] is not None and overhead[2]["met"] is None
    assert not reports[0]["warnings"] or "text-state cache" not in " ".join(reports[0]["warnings"])
    assert sum("text-state cache" in w for w in reports[2]["warnings"]) == 2
