"""The served stack against hostile requests: the HTTP and gRPC guards, the supervisor, and
`python -m boot_serve.serve` as users start it (docs/robustness.md, "Hostile requests").

The request that crashes the tritonserver 2.51 of nvidia-pytriton is real: an inference request
whose JSON nests 35,000 arrays. Every test here sends it, or its variants, to real servers.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from boot_serve.client import Client, RequestError, ServerUnavailableError
from boot_serve.guard_limits import MAX_BODY_BYTES, MAX_JSON_DEPTH, Limits
from boot_serve.guard_rules import nests_deeper
from boot_serve.service import Service, describe_exit
from boot_serve.soak import tree_rss_mb

ROOT = Path(__file__).resolve().parent.parent
INFER = "/v2/models/boot_txt2img/infer"
GOOD = ("a red circle", 0)


def crash_body(depth: int = 35_000) -> bytes:
    """An inference request whose PROMPT data nests `depth` arrays: Triton 2.51 dies on it (SIGSEGV)."""
    return ('{"inputs":[{"name":"PROMPT","shape":[1,1],"datatype":"BYTES","data":' + "[" * depth + "]" * depth
            + '}]}').encode()


def json_request(prompt: str = GOOD[0], seed: int = GOOD[1], binary_output: bool = True) -> bytes:
    return json.dumps({"inputs": [{"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [[prompt]]},
                                  {"name": "SEED", "shape": [1, 1], "datatype": "INT64", "data": [[seed]]}],
                       "outputs": [{"name": "IMAGE", "parameters": {"binary_data": binary_output}}]}).encode()


def post(url: str, body: bytes | None, headers: dict | None = None, path: str = INFER) -> tuple[int | str, bytes]:
    """(status, body) of a POST (a GET when `body` is None); a dropped connection gives the
    exception's name instead of a status."""
    req = urllib.request.Request(f"http://{url}{path}", data=body, method="GET" if body is None else "POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, OSError) as err:
        return type(err).__name__, b""


def raw_exchange(url: str, data: bytes, responses: int, timeout: float = 60) -> bytes:
    """Send raw bytes on one connection; read until `responses` complete HTTP responses came back."""
    host, port = url.rsplit(":", 1)
    got = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        while _complete_responses(got) < responses:
            piece = sock.recv(1 << 16)
            if not piece:
                break
            got += piece
    return got


def _complete_responses(data: bytes) -> int:
    n, rest = 0, data
    while b"\r\n\r\n" in rest:
        head, rest = rest.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if len(rest) < length:
            break
        rest, n = rest[length:], n + 1
    return n


def bodies(data: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each response in a raw stream."""
    out, rest = [], data
    while b"\r\n\r\n" in rest:
        head, rest = rest.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        out.append((head.split(b"\r\n")[0], rest[:length]))
        rest = rest[length:]
    return out


def wait_serving(client: Client, timeout: float = 120) -> tuple[np.ndarray, int]:
    """The good image once the server answers again; (image, ServerUnavailableError count meanwhile)."""
    deadline, errors = time.monotonic() + timeout, 0
    while True:
        try:
            return np.asarray(client.generate([GOOD[0]], [GOOD[1]])[0]), errors
        except ServerUnavailableError:
            errors += 1
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def service(exported_repository):
    logs: list[str] = []
    with Service(exported_repository, exit_timeout=5, log=logs.append) as svc:
        svc.logs = logs
        yield svc


@pytest.fixture(scope="module")
def reference(service) -> np.ndarray:
    with Client(service.triton_http_url) as c:
        return np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0])


def assert_serving_unrestarted(service, reference, pid: int) -> None:
    assert service.server.process.pid == pid and service.supervisor.restarts == [], service.logs
    with Client(service.http_url) as c:
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)


# --------------------------------------------------------------------------------------------
# The rule itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, deeper", [
    (b'{"a":[[1]]}', False),
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, False),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), True),
    (b'{"s":"' + b"[" * 100 + b'"}', False),                       # brackets inside a string
    (b'{"s":"\\"' + b"[" * 100 + b'"}', False),                    # ... after an escaped quote
    (b'[' * 10 + b'"x"' + b']' * 10 + b'[' * 10 + b']' * 10, False),  # many brackets, shallow
    (b'{"a":' * (MAX_JSON_DEPTH + 1), True),                       # unterminated, still counted
], ids=["shallow", "at_limit", "past_limit", "in_string", "escaped_quote", "wide", "objects"])
def test_nesting_rule(text, deeper):
    assert nests_deeper(text, MAX_JSON_DEPTH) is deeper


def test_the_nesting_rule_is_linear_on_a_megabyte():
    body = b"[" * (MAX_BODY_BYTES // 2) + b"]" * (MAX_BODY_BYTES // 2)
    t = time.perf_counter()
    assert nests_deeper(body, MAX_JSON_DEPTH)
    wide = b"[" + b"[1]," * (MAX_BODY_BYTES // 4 - 1) + b"[1]]"
    assert not nests_deeper(wide, MAX_JSON_DEPTH)
    assert time.perf_counter() - t < 2.0


def test_limits_and_exit_descriptions_are_checked():
    with pytest.raises(ValueError):
        Limits(max_body_bytes=0)
    assert describe_exit(-11) == "SIGSEGV, exit -11" and describe_exit(3) == "exit code 3"


# --------------------------------------------------------------------------------------------
# HTTP guard: hostile requests refused, nothing restarts
# --------------------------------------------------------------------------------------------
def test_the_crashing_request_gets_400_from_the_guard_and_triton_never_restarts(service, reference):
    pid = service.server.process.pid
    for headers, body in (({}, crash_body()), ({"Content-Encoding": "gzip"}, gzip.compress(crash_body())),
                          ({"Content-Encoding": "deflate"}, zlib.compress(crash_body())),
                          ({"Inference-Header-Content-Length": str(len(crash_body()))}, crash_body() + b"\0" * 16)):
        status, text = post(service.http_url, body, headers)
        assert status == 400, (headers, status, text)
        assert json.loads(text)["error"].startswith(f"the request JSON nests more than {MAX_JSON_DEPTH} levels deep")
    assert_serving_unrestarted(service, reference, pid)


@pytest.mark.parametrize("case", ["content_length", "chunked", "gzip_bomb", "deflate_bomb"])
def test_bodies_over_the_limit_get_413(service, reference, case):
    pid = service.server.process.pid
    host, port = service.http_url.rsplit(":", 1)
    if case == "content_length":  # refused from the header alone: the 64 MiB are never sent
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {64 << 20}\r\n\r\n".encode())
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413") and f"is {64 << 20} bytes".encode() in answer
    elif case == "chunked":
        piece = b"x" * (256 << 10)
        data = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + \
            (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * 5 + b"0\r\n\r\n"
        answer = raw_exchange(service.http_url, data, 1)
        assert answer.startswith(b"HTTP/1.1 413") and b"chunked request body passes" in answer
    else:  # 50 MiB of spaces compress to ~50 KB
        encoding = case.split("_")[0]
        packed = gzip.compress(b" " * (50 << 20)) if encoding == "gzip" else zlib.compress(b" " * (50 << 20))
        status, text = post(service.http_url, packed, {"Content-Encoding": encoding})
        assert status == 413 and f"inflates ({encoding}) to over {MAX_BODY_BYTES} bytes".encode() in text
    assert_serving_unrestarted(service, reference, pid)


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (f"POST {INFER} HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".encode(), b"400"),
    (f"POST {INFER} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".encode(), b"400"),
    (f"GET /v2/health/ready HTTP/1.1\r\nX-Big: {'a' * (32 << 10)}\r\n\r\n".encode(), b"431"),
], ids=["not_http", "length_and_chunked", "two_lengths", "huge_header"])
def test_malformed_framing_is_refused(service, reference, data, status):
    answer = raw_exchange(service.http_url, data, 1)
    assert answer.split(b" ")[1] == status, answer[:200]
    assert_serving_unrestarted(service, reference, service.server.process.pid)


def test_a_request_slower_than_the_read_timeout_gets_408(service, reference):
    from boot_serve.http_guard import Guard

    host, port = service.triton_http_url.rsplit(":", 1)
    with Guard(host, int(port), limits=Limits(read_timeout=0.5), log=lambda line: None) as guard:
        gh, gp = guard.url.rsplit(":", 1)
        with socket.create_connection((gh, int(gp)), timeout=30) as sock:
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            t = time.monotonic()
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
        assert 0.4 < time.monotonic() - t < 10
        with Client(guard.url) as c:  # an idle connection is left alone, a prompt one served
            assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)


def test_connections_beyond_the_cap_get_429_idle_ones_give_way_and_the_cap_frees_up(service, reference):
    from boot_serve.http_guard import Guard

    host, port = service.triton_http_url.rsplit(":", 1)
    with Guard(host, int(port), limits=Limits(max_connections=4), log=lambda line: None) as guard:
        gh, gp = guard.url.rsplit(":", 1)
        busy = [socket.create_connection((gh, int(gp)), timeout=30) for _ in range(4)]
        for sock in busy:  # each in the middle of a request head
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")
        time.sleep(0.3)
        with socket.create_connection((gh, int(gp)), timeout=30) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 429") and b"4 connections open" in answer, answer
        for sock in busy:
            sock.close()
        deadline = time.monotonic() + 10
        while guard.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        idle = [socket.create_connection((gh, int(gp)), timeout=30) for _ in range(4)]  # no request in them
        time.sleep(0.3)
        with Client(guard.url) as c:  # the oldest idle connection makes room
            assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
        assert idle[0].recv(16) == b""  # closed by the guard
        for sock in idle:
            sock.close()


# --------------------------------------------------------------------------------------------
# HTTP guard: valid requests pass unchanged
# --------------------------------------------------------------------------------------------
def test_valid_requests_come_back_byte_identical(service, reference):
    """JSON and binary-tensor requests, plain, gzip and deflate bodies, keep-alive, pipelining,
    chunked bodies and Expect: 100-continue: the guard's answers equal Triton's own."""
    body = json_request()
    direct = post(service.triton_http_url, body)
    assert direct[0] == 200
    for headers, sent in (({}, body), ({"Content-Encoding": "gzip"}, gzip.compress(body)),
                          ({"Content-Encoding": "deflate"}, zlib.compress(body))):
        assert post(service.http_url, sent, headers) == direct, headers
    text = post(service.http_url, json_request(binary_output=False))
    assert text[0] == 200 and text == post(service.triton_http_url, json_request(binary_output=False))
    one = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    pipelined = bodies(raw_exchange(service.http_url, one * 3, 3))  # three requests in one write
    assert [b for _, b in pipelined] == [direct[1]] * 3 and all(s.endswith(b"200 OK") for s, _ in pipelined)
    chunked = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:40], body[40:])) + b"0\r\n\r\n"
    assert bodies(raw_exchange(service.http_url, chunked, 1))[0][1] == direct[1]
    expect = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    host, port = service.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(expect.encode())
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        got = b""
        while _complete_responses(got) < 1:
            got += sock.recv(1 << 16)
    assert bodies(got)[0][1] == direct[1]
    for protocol in ("http", "grpc"):
        with Client(service.http_url if protocol == "http" else service.grpc_url, protocol) as c:
            assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)


def test_errors_pass_through_unchanged(service):
    """A request Triton refuses gets Triton's own answer through either guard."""
    for protocol, guarded, direct in (("http", service.http_url, service.triton_http_url),
                                      ("grpc", service.grpc_url, service.triton_grpc_url)):
        messages = []
        for url in (guarded, direct):
            with Client(url, protocol) as c, pytest.raises(RequestError) as err:
                c.generate(["x " * 40], [0])
            messages.append((str(err.value), err.value.status))
        assert messages[0] == messages[1] and "tokens long" in messages[0][0], messages


# --------------------------------------------------------------------------------------------
# gRPC guard: oversized messages refused before they are buffered
# --------------------------------------------------------------------------------------------
def test_large_grpc_requests_are_refused_and_the_server_keeps_its_memory(service, reference):
    import tritonclient.grpc as grpcclient

    pid = service.server.process.pid
    before = tree_rss_mb(pid)
    with grpcclient.InferenceServerClient(service.grpc_url,
                                          channel_args=[("grpc.max_send_message_length", 1 << 30)]) as c:
        for _ in range(4):
            prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
            prompt.set_data_from_numpy(np.array([[b"x" * (64 << 20)]], dtype=object))
            seed = grpcclient.InferInput("SEED", [1, 1], "INT64")
            seed.set_data_from_numpy(np.array([[0]], dtype=np.int64))
            with pytest.raises(Exception, match=f"RESOURCE_EXHAUSTED.*larger than max .* vs. {MAX_BODY_BYTES}"):
                c.infer("boot_txt2img", [prompt, seed])
    grown = tree_rss_mb(pid) - before
    assert grown < 32, f"tritonserver and its stubs grew {grown:.0f} MB"  # unguarded: ~250 MB per request
    assert_serving_unrestarted(service, reference, pid)


# --------------------------------------------------------------------------------------------
# The supervisor: the crash sent past the guard
# --------------------------------------------------------------------------------------------
def test_a_crash_past_the_guard_is_restarted_and_the_same_clients_recover(exported_repository):
    logs: list[str] = []
    with Service(exported_repository, exit_timeout=5, log=logs.append) as svc:
        clients = [Client(svc.http_url, "http", timeout=30), Client(svc.grpc_url, "grpc", timeout=30)]
        before = [wait_serving(c)[0] for c in clients]
        pid = svc.server.process.pid
        t0 = time.monotonic()
        assert post(svc.triton_http_url, crash_body())[0] in ("RemoteDisconnected", "ConnectionResetError",
                                                             "URLError", "BadStatusLine")
        gaps = []
        for c, image in zip(clients, before):
            again, errors = wait_serving(c)
            gaps.append(time.monotonic() - t0)
            assert np.array_equal(again, image)
        assert svc.server.process.pid != pid
        assert svc.supervisor.serving.wait(30)  # clients can be served a moment before the supervisor sees "ready"
        (restart,) = svc.supervisor.restarts
        assert restart["cause"] == "SIGSEGV, exit -11", logs
        assert any("tritonserver died (SIGSEGV, exit -11); restarting it in 1 s" in line for line in logs), logs
        print(f"\nserving again {gaps[0]:.2f} s (HTTP) / {gaps[1]:.2f} s (gRPC) after the crash; "
              f"supervisor: down {restart['down_s']} s")
        assert restart["down_s"] < 60
        for c in clients:
            c.close()


def test_the_supervisor_gives_up_after_too_many_crashes(exported_repository):
    logs: list[str] = []
    with Service(exported_repository, exit_timeout=5, log=logs.append, max_crashes=1, backoff=(0.2, 0.2),
                 health_port=0) as svc:
        for _ in range(2):
            svc.supervisor.serving.wait(60)
            svc.server.process.send_signal(signal.SIGSEGV)
            svc.server.process.wait(30)
            time.sleep(0.5)
        assert svc.supervisor.gave_up.wait(60), logs
        assert not svc.running() and len(svc.supervisor.restarts) == 1
        assert "more than the 1 allowed: not restarting it again" in logs[-1]
        with Client(svc.http_url) as c, pytest.raises(ServerUnavailableError):
            c.generate([GOOD[0]], [GOOD[1]])
        for path in ("/v2/health/ready", INFER):  # the service says it gave up, on every road
            status, text = post(svc.http_url, json_request() if path == INFER else None, path=path)
            assert status == 503 and "gave up" in json.loads(text)["error"], (path, status, text)
        for probe in ("live", "ready"):  # and the probes tell a supervisor (Kubernetes) to restart it
            status, text = post(svc.health_url, None, path=f"/v2/health/{probe}")
            assert status == 503 and "gave up" in json.loads(text)["error"], (probe, status, text)


# --------------------------------------------------------------------------------------------
# python -m boot_serve.serve, as users start it
# --------------------------------------------------------------------------------------------
def test_the_default_server_refuses_the_crash_and_restarts_when_it_gets_past(exported_repository):
    proc = subprocess.Popen([sys.executable, "-m", "boot_serve.serve", "--repository", str(exported_repository),
                             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout", "5"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops it" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        text = "".join(lines)
        http = next(line.split()[1] for line in lines if line.strip().startswith("HTTP"))
        triton_http = next(line.split("Triton's own: ")[1].strip(" )\n") for line in lines
                           if line.strip().startswith("HTTP"))
        assert "(guarded; Triton's own: 127.0.0.1:" in text and "restarts up to 5 crashes within 300 s" in text
        assert post(http, crash_body())[0] == 400
        assert not any("died" in line for line in lines)
        with Client(http) as c:
            image = wait_serving(c)[0]
            post(triton_http, crash_body())
            assert np.array_equal(wait_serving(c)[0], image)
        assert any("tritonserver died (SIGSEGV, exit -11)" in line for line in lines), "".join(lines)
        while not any("tritonserver is serving again" in line for line in lines):
            assert time.monotonic() < deadline + 60, "".join(lines)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
