"""The default served stack (guards, supervisor, probe listener) against hostile requests, one class
of defect per test, sent as an attacker would to a real tritonserver (docs/robustness.md lists the
classes). The tritonserver process must keep its pid through the whole module: a restart is a
failure here, even though the supervisor would recover from it.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from boot_serve.access import KEY_HEADER
from boot_serve.client import Client
from boot_serve.service import Service
from boot_serve.soak import tree_rss_mb
from tests.test_guard import GOOD, INFER, bodies, crash_body, json_request, post, raw_exchange

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(exported_repository):
    logs: list[str] = []
    with Service(exported_repository, exit_timeout=5, log=logs.append, health_port=0) as svc:
        svc.logs = logs
        svc.first_pid = svc.server.process.pid
        yield svc
    assert svc.server.process.pid == svc.first_pid and not svc.supervisor.restarts, "tritonserver restarted"


@pytest.fixture(scope="module")
def reference(service) -> np.ndarray:
    with Client(service.triton_http_url) as c:
        return np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0])


def still_serving(service, reference) -> None:
    assert service.server.process.pid == service.first_pid and not service.supervisor.restarts, service.logs[-5:]
    with Client(service.http_url) as c:
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)


def raw(url: str, head: str, body: bytes = b"") -> tuple[bytes, dict]:
    """(status, JSON body) of one raw request on its own connection."""
    answer = raw_exchange(url, head.encode("latin-1") + body, 1, timeout=30)
    assert answer, f"no answer to {head[:80]!r}"
    (status_line, text), *_ = bodies(answer)
    return status_line.split(b" ")[1], json.loads(text) if text else {}


def infer_head(extra: str, length: int) -> str:
    return f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {length}\r\n\r\n"


# --------------------------------------------------------------------------------------------
# 1. Headers the guard or Triton interpret: strict grammar, or 400 with a message
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"+{n}", b"{n}x", b" {n}", b"{n}\x00", "{n}٣".encode(), b"0x{n}", b"-1", b"1e3",
                                   b"{n} {n}", "٣".encode(), b"{n}\x01"])
def test_lenient_numbers_get_400_and_the_crash_never_reaches_triton(service, reference, value):
    body = crash_body() + b"\0" * 16
    value = value.replace(b"{n}", str(len(crash_body())).encode())
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
    answer = raw_exchange(service.http_url, head + b"Inference-Header-Content-Length: " + value + b"\r\n\r\n" + body, 1)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(bodies(answer)[0][1])["error"]
    still_serving(service, reference)


@pytest.mark.parametrize("header", ["Content-Length: +{n}", "Content-Length: {n}, {m}", "X-Note: a\x01b",
                                   "Accept-Encoding: gzip;q=1e999", "Accept-Encoding: gzip;q=\x7f",
                                   "Content-Encoding: gzip\x0b", "Expect: 100-continue\x00"])
def test_malformed_interpreted_headers_get_an_answer_not_a_reset(service, reference, header):
    body = json_request()
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n" + header.format(n=len(body), m=len(body) + 1) + "\r\n"
    if "Content-Length" not in header:
        head += f"Content-Length: {len(body)}\r\n"
    status, error = raw(service.http_url, head + "\r\n", body)
    assert status == b"400" and error["error"], (header, status, error)
    still_serving(service, reference)


# --------------------------------------------------------------------------------------------
# 2. Content-Encoding: decoded here, exactly what the label says, within the size limit
# --------------------------------------------------------------------------------------------
def _mangled(kind: str, data: bytes) -> tuple[str, bytes]:
    packed = gzip.compress(data)
    if kind == "gzip_as_deflate":
        return "deflate", packed
    if kind == "deflate_as_gzip":
        return "gzip", zlib.compress(data)
    if kind == "raw_deflate":
        c = zlib.compressobj(wbits=-15)
        return "deflate", c.compress(data) + c.flush()
    if kind == "truncated":
        return "gzip", packed[:-8]
    if kind == "trailing":
        return "gzip", packed + b"trailing bytes"
    if kind == "bad_crc":
        return "gzip", packed[:-8] + struct.pack("<I", zlib.crc32(data) ^ 1) + packed[-4:]
    if kind == "two_members":
        return "gzip", packed + packed
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gzip_as_deflate", "deflate_as_gzip", "raw_deflate", "truncated", "trailing",
                                  "bad_crc", "two_members"])
def test_bodies_not_exactly_what_their_label_says_get_400(service, reference, kind):
    encoding, body = _mangled(kind, crash_body())
    status, text = post(service.http_url, body, {"Content-Encoding": encoding})
    assert status == 400, (kind, status, text)
    still_serving(service, reference)


@pytest.mark.parametrize("encoding, status", [("br", 415), ("gzip, gzip", 415), ("compress", 415),
                                              ("identity, gzip", 415)])
def test_encodings_the_server_does_not_decode_get_415(service, encoding, status):
    got, text = post(service.http_url, gzip.compress(json_request()), {"Content-Encoding": encoding})
    assert got == status and "Content-Encoding" in json.loads(text)["error"], (encoding, got, text)


def test_a_compressed_bomb_never_inflates_inside_triton(service, reference):
    bomb = gzip.compress(b" " * (200 << 20))  # 200 KB on the wire, 200 MB inflated
    before = tree_rss_mb(service.server.process.pid)
    for encoding, body in (("gzip", bomb), ("GZIP", bomb), ("deflate", zlib.compress(b" " * (200 << 20)))):
        status, text = post(service.http_url, body, {"Content-Encoding": encoding})
        assert status == 413 and b"inflates" in text, (encoding, status, text)
    assert tree_rss_mb(service.server.process.pid) - before < 32
    still_serving(service, reference)


def test_a_label_in_capitals_is_still_served_like_triton_serves_it(service):
    body = json_request()
    direct = post(service.triton_http_url, body)
    assert direct[0] == 200
    assert post(service.http_url, gzip.compress(body), {"Content-Encoding": "GZIP"}) == direct


# --------------------------------------------------------------------------------------------
# 3. Linear-time scanning that never blocks other clients
# --------------------------------------------------------------------------------------------
def _worst(n: int = 1 << 20) -> list[bytes]:
    data = b'{"inputs":[{"name":"SEED","shape":[1,1],"datatype":"INT64","data":['
    return [b'{"a":"' + b'\\"' * (n // 2 - 8) + b'"}', b'{"a":"' + b"\\\\\\\"" * (n // 4 - 4) + b'"}',
            b'{"a":"' + b"\\\\" * (n // 2 - 8), b'{"a":[' + b'"",' * (n // 3 - 4) + b'""]}',
            b'{"a":[' + b"[[]]," * (n // 5 - 4) + b"[]]}", b'{"a":' + b"[" * (n // 2 - 4) + b"]" * (n // 2 - 4) + b"}",
            # what costs json.loads most per byte: nested lists and objects in tensor data
            data + b"[[[[[[[[[[1]]]]]]]]]]," * (n // 22 - 4) + b"1]}]}", data + b"{}," * (n // 3 - 30) + b"1]}]}"]


def test_worst_megabytes_are_answered_quickly_and_others_are_served_meanwhile(service, reference):
    def good_latencies(k: int) -> list[float]:
        out = []
        with Client(service.http_url) as c:
            for _ in range(k):
                t = time.perf_counter()
                c.generate([GOOD[0]], [GOOD[1]])
                out.append(time.perf_counter() - t)
        return out

    quiet = good_latencies(10)
    hostile_times: list[float] = []
    stop = threading.Event()

    def attack():
        while not stop.is_set():
            for body in _worst():
                t = time.perf_counter()
                status, _ = post(service.http_url, body)
                hostile_times.append(time.perf_counter() - t)
                assert status in (400, 500), status  # refused here, or a JSON Triton refuses itself

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(2)]
    for a in attackers:
        a.start()
    time.sleep(0.5)
    busy = good_latencies(10)
    stop.set()
    for a in attackers:
        a.join(60)
    q50, b50 = np.median(quiet) * 1e3, np.median(busy) * 1e3
    print(f"\ngood request p50 {q50:.1f} ms quiet, {b50:.1f} ms while 2 clients sent worst-case 1 MiB bodies "
          f"(slowest {max(busy) * 1e3:.0f} ms); each hostile body answered in at most "
          f"{max(hostile_times) * 1e3:.0f} ms ({len(hostile_times)} sent)")
    assert max(hostile_times) < 2.0 and max(busy) < 2.0 and b50 < 3 * q50 + 100
    still_serving(service, reference)


# --------------------------------------------------------------------------------------------
# 3b. Numbers Triton sizes memory by: a shape backed by the request, nothing in shared memory
# --------------------------------------------------------------------------------------------
def _seed_request(shape, data=(1,), datatype="INT64", **extra) -> bytes:
    seed = {"name": "SEED", "shape": list(shape), "datatype": datatype, "data": list(data), **extra}
    return json.dumps({"inputs": [{"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [GOOD[0]]},
                                  seed]}).encode()


# Sent to Triton 2.51's own port, [1, 10**12] ends the process (std::bad_alloc while it sizes the
# buffer from the shape, before reading the data), so does [0, 2**64 - 1] (read as the wildcard -1:
# 2**64 - 8 bytes), and [1, 2 * 10**9] makes it zero 16 GB.
UNBACKED_SHAPES = {
    "int64_1e12": _seed_request([1, 10**12]),
    "fp32_1e12": _seed_request([1, 10**12], [1.0], "FP32"),
    "int64_2e9": _seed_request([1, 2 * 10**9]),
    "zero_times_huge": _seed_request([0, 2**63], []),
    "zero_times_the_wildcard": _seed_request([0, 2**64 - 1], []),
    "the_huge_shape_first_of_two": _seed_request([1, 1]).replace(b'"shape": [1, 1], "datatype": "INT64"',
                                                                 b'"shape": [1, 1000000000000], "shape": [1, 1], '
                                                                 b'"datatype": "INT64"'),
    "nested_data_short_of_the_shape": _seed_request([2, 3], [[1, 2], [3]]),
}


@pytest.mark.parametrize("case", UNBACKED_SHAPES, ids=list(UNBACKED_SHAPES))
def test_shapes_the_request_does_not_back_get_400_on_every_road(service, reference, case):
    body = UNBACKED_SHAPES[case]
    for headers, sent in (({}, body), ({"Content-Encoding": "gzip"}, gzip.compress(body)),
                          ({"Inference-Header-Content-Length": str(len(body))}, body + b"\0" * 8)):
        status, text = post(service.http_url, sent, headers)
        assert status == 400 and json.loads(text)["error"], (case, headers, status, text)
    still_serving(service, reference)


def test_binary_tensors_cannot_promise_more_than_they_carry(service, reference):
    header = json.dumps({"inputs": [{"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [GOOD[0]]},
                                    {"name": "SEED", "shape": [1, 2**30], "datatype": "INT64",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    status, text = post(service.http_url, header + struct.pack("<q", 0),
                        {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"binary bytes" in text, (status, text)
    still_serving(service, reference)


def test_tensors_in_shared_memory_get_403(service, reference):
    body = _seed_request([1, 1], [], parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})
    body = body.replace(b', "data": []', b"")
    status, text = post(service.http_url, body)
    assert status == 403 and b"shared memory is closed" in text, (status, text)
    still_serving(service, reference)


def test_requests_every_client_sends_are_served_as_triton_serves_them(service):
    """tritonclient's JSON and binary forms, with a request id, priority, timeout and sequence
    fields, and data nested by the shape: the guard's answers equal Triton's own."""
    import tritonclient.http as httpclient

    for binary in (True, False):
        for extra in ({}, {"request_id": "r-1", "priority": 2, "timeout": 10**9}, {"sequence_id": 5}):
            answers = []
            for url in (service.http_url, service.triton_http_url):
                with httpclient.InferenceServerClient(url) as c:
                    prompt = httpclient.InferInput("PROMPT", [2, 1], "BYTES")
                    prompt.set_data_from_numpy(np.array([[GOOD[0].encode()], [b"a blue square"]], dtype=object),
                                               binary_data=binary)
                    seed = httpclient.InferInput("SEED", [2, 1], "INT64")
                    seed.set_data_from_numpy(np.array([[0], [1]], dtype=np.int64), binary_data=binary)
                    out = httpclient.InferRequestedOutput("IMAGE", binary_data=binary)
                    answers.append(c.infer("boot_txt2img", [prompt, seed], outputs=[out], **extra).as_numpy("IMAGE"))
            assert len(answers[0]) == 2 and np.array_equal(*answers), (binary, extra)
    nested = _seed_request([1, 1], [[GOOD[1]]])
    assert post(service.http_url, nested) == post(service.triton_http_url, nested)


# --------------------------------------------------------------------------------------------
# 4. Control APIs closed, twice
# --------------------------------------------------------------------------------------------
CLOSED = [("POST", "/v2/systemsharedmemory/region/r/register", b'{"key":"/x","offset":0,"byte_size":64}'),
          ("GET", "/v2/systemsharedmemory/status", None), ("POST", "/v2/cudasharedmemory/region/r/register", b"{}"),
          ("POST", "/v2/repository/index", b"{}"), ("POST", "/v2/repository/models/boot_txt2img/unload", b"{}"),
          ("POST", "/v2/trace/setting", b'{"trace_rate":"99999999999"}'), ("GET", "/v2/trace/setting", None),
          ("POST", "/v2/models/boot_txt2img/trace/setting", b"{}"), ("POST", "/v2/logging", b'{"log_verbose_level":1}'),
          ("GET", "/v2/models/stats", None), ("GET", "/v2/models/boot_txt2img/stats", None)]


@pytest.mark.parametrize("method, path, body", CLOSED, ids=[f"{m} {p}" for m, p, _ in CLOSED])
def test_control_apis_are_closed_at_the_guard_and_at_triton(service, method, path, body):
    for url, expected in ((service.http_url, b"403"), (service.triton_http_url, b"403")):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body or b'')}\r\n\r\n"
        status, error = raw(url, head, body or b"")
        assert status == expected, (url, method, path, status, error)
        assert error.get("error"), (url, path)


@pytest.mark.parametrize("target", ["/v2/%72epository/index", "/v2/repository%2Findex", "http://evil/v2/logging",
                                    "/v2/models/boot_txt2img/../../logging", "/v2/models/text_encoder/infer",
                                    "/v2/models/unet/config", "/v2/models/boot_txt2img/generate", "/metrics"])
def test_encoded_and_absolute_targets_cannot_reach_them(service, target):
    status, error = raw(service.http_url, f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n", b"{}")
    assert status in (b"403", b"404"), (target, status, error)


def test_statistics_answer_the_operator_key_only(service):
    path = "/v2/models/boot_txt2img/stats"
    for url in (service.http_url, service.triton_http_url):
        status, _ = raw(url, f"GET {path} HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}: wrong\r\n\r\n")
        assert status == b"403"
        status, stats = raw(url, f"GET {path} HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}: {service.operator_key}\r\n\r\n")
        assert status == b"200" and stats["model_stats"][0]["name"] == "boot_txt2img"
    with Client(service.http_url, operator_key=service.operator_key) as c:
        assert c.statistics()["model_stats"][0]["inference_stats"]["success"]["count"] >= 1


# --------------------------------------------------------------------------------------------
# 5. Exhaustion: slow and idle clients do not deny service to others or to the probes
# --------------------------------------------------------------------------------------------
def _connect_from(source: str, url: str) -> socket.socket:
    host, port = url.rsplit(":", 1)
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


def test_a_few_hundred_slow_or_idle_clients_deny_no_one(service, reference):
    from boot_serve.guard_limits import MAX_CONNECTIONS_PER_CLIENT

    hogs, refused = [], 0
    try:
        for _ in range(MAX_CONNECTIONS_PER_CLIENT + 36):  # one address holding idle connections
            hogs.append(_connect_from("127.0.0.2", service.http_url))
        for i in range(200):  # two hundred addresses, each dribbling a request head
            sock = _connect_from(f"127.0.1.{i + 1}", service.http_url)
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode())
            hogs.append(sock)
        time.sleep(0.5)
        for sock in hogs[:MAX_CONNECTIONS_PER_CLIENT + 36]:
            sock.setblocking(False)
            try:
                refused += sock.recv(64).startswith(b"HTTP/1.1 429")
            except BlockingIOError:
                pass
        assert refused == 36, refused
        t = time.perf_counter()
        with Client(service.http_url) as c:
            assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
        served = time.perf_counter() - t
        for probe in ("live", "ready"):
            assert post(service.health_url, None, path=f"/v2/health/{probe}")[0] == 200
        print(f"\nwith {len(hogs)} hostile connections open: a good request served in {served * 1e3:.0f} ms, "
              f"{refused} connections beyond the per-address cap refused with 429")
    finally:
        for sock in hogs:
            sock.close()


def test_a_request_head_slower_than_the_head_timeout_gets_408(service):
    from boot_serve.guard_limits import Limits
    from boot_serve.http_guard import Guard

    with Guard("127.0.0.1", int(service.triton_http_url.rsplit(":", 1)[1]), limits=Limits(head_timeout=0.5),
               log=lambda line: None) as guard:
        sock = _connect_from("127.0.0.1", guard.url)
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")
        t = time.monotonic()
        for _ in range(3):
            time.sleep(0.2)
            sock.sendall(b"X-Slow: 1\r\n")
        answer = sock.recv(4096)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"request head did not arrive within 0.5 s" in answer
        assert time.monotonic() - t < 5


def test_probes_tell_the_truth_while_the_guard_loop_is_stalled(service):
    assert post(service.health_url, None, path="/v2/health/live")[0] == 200
    service.guard._loop.call_soon_threadsafe(time.sleep, 8)  # the guard's event loop stops for 8 s
    deadline, status = time.monotonic() + 10, 200
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        status, text = post(service.health_url, None, path="/v2/health/live")
    assert status == 503 and b"event loop" in text, (status, text)
    time.sleep(4)
    assert post(service.health_url, None, path="/v2/health/live")[0] == 200


# --------------------------------------------------------------------------------------------
# 6. The supervisor's restart cannot be hijacked (a module of its own server: it restarts)
# --------------------------------------------------------------------------------------------
def test_a_process_on_the_old_ports_gets_no_client_traffic(exported_repository):
    logs: list[str] = []
    with Service(exported_repository, exit_timeout=5, log=logs.append, backoff=(1.0, 1.0)) as svc:
        with Client(svc.http_url) as c:
            image = np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0])
        old = {name: svc.server.ports[name] for name in ("http", "grpc")}
        svc.server.process.kill()
        svc.server.process.wait(30)
        squatters, accepted = [], []
        for port in old.values():  # a local process takes Triton's ports during the backoff
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            sock.settimeout(0.2)
            squatters.append(sock)
        deadline = time.monotonic() + 60
        while not svc.supervisor.serving.is_set() and time.monotonic() < deadline:
            for sock in squatters:
                try:
                    accepted.append(sock.accept()[0])
                except TimeoutError:
                    pass
        assert svc.supervisor.serving.is_set(), logs
        for protocol, url in (("http", svc.http_url), ("grpc", svc.grpc_url)):
            with Client(url, protocol) as c:
                assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), image)
        for sock in squatters:
            try:
                accepted.append(sock.accept()[0])
            except TimeoutError:
                pass
            sock.close()
        assert accepted == [] and all(svc.server.ports[n] != old[n] for n in old), (accepted, svc.server.ports)
        assert svc.server.owns_ports()
