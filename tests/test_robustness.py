"""Bad input against the server and the CLIs: each gets a clear error, nothing crashes, the
server keeps serving. (The request-level cases of the serving issue live in test_serving.py:
empty / whitespace / over-long / non-UTF-8 prompts, negative seeds, NaN/Inf/out-of-range
guidance, wrong dtypes and shapes, missing and unknown inputs, batches over max_batch_size.)
This module adds what arrives below or around a well-formed request: raw HTTP bodies, huge
prompts, duplicate inputs, unknown models and versions, and broken files given to the CLIs.
The full list with the error each gets is docs/robustness.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from boot_serve.client import Client, RequestError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
GOOD = ("a red circle", 0)


@pytest.fixture(scope="module")
def client(triton_server):
    with Client(triton_server.http_url, "http", timeout=60) as c:
        c.generate([GOOD[0]], [GOOD[1]])  # warm
        yield c


@pytest.fixture(scope="module")
def good_image(client) -> np.ndarray:
    return np.asarray(client.generate([GOOD[0]], [GOOD[1]])[0])


def assert_still_serving(client: Client, good_image: np.ndarray) -> None:
    assert np.array_equal(np.asarray(client.generate([GOOD[0]], [GOOD[1]])[0]), good_image)


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    """Raw HTTP POST; (status, body text), never raises for an HTTP error status."""
    req = urllib.request.Request(f"http://{url}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def infer_body(*inputs: dict) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


PROMPT = {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["a red circle"]}
SEED = {"name": "SEED", "shape": [1, 1], "datatype": "INT64", "data": [0]}
INFER = "/v2/models/boot_txt2img/infer"

# name -> (path, body, headers, status, message regex). Statuses are Triton 2.51's own: it answers
# 500, not 400, when the JSON cannot be parsed (recorded here so a change shows up).
HTTP_CASES = {
    "body_not_json": (INFER, b"{not json", None, 500, "failed to parse the request JSON buffer"),
    "body_empty": (INFER, b"", None, 400, "Raw request must only have 1 input .* got 3 inputs"),
    "inputs_not_a_list": (INFER, b'{"inputs": {"PROMPT": 1}}', None, 500,
                          "Unable to parse 'inputs': attempt to access JSON non-array as array"),
    "shape_says_batch_2": (INFER, infer_body({**PROMPT, "shape": [2, 1]}, SEED), None, 400,
                           "input 'PROMPT' batch size does not match other inputs"),
    "seed_data_is_text": (INFER, infer_body(PROMPT, {**SEED, "data": ["zero"]}), None, 500,
                          "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"),
    "duplicate_input": (INFER, infer_body(PROMPT, SEED, SEED), None, 400, "input 'SEED' already exists in request"),
    "binary_header_longer_than_body": (INFER, infer_body(PROMPT, SEED), {"Inference-Header-Content-Length": "100000"},
                                       400, r"inference header size should be in range \(0, 165\), got: 100000"),
    "unknown_model": ("/v2/models/nope/infer", infer_body(PROMPT, SEED), None, 404,
                      "unknown model: 'nope' is not found"),
    "unknown_version": ("/v2/models/boot_txt2img/versions/7/infer", infer_body(PROMPT, SEED), None, 404,
                        "'boot_txt2img' version 7 is not found"),
}


@pytest.mark.parametrize("case", HTTP_CASES, ids=list(HTTP_CASES))
def test_malformed_http(triton_server, client, good_image, case):
    path, body, headers, status, message = HTTP_CASES[case]
    got_status, text = post(triton_server.http_url, path, body, headers)
    assert got_status == status, (got_status, text)
    assert "error" in json.loads(text), text
    assert re.search(message, text, re.I), text
    assert_still_serving(client, good_image)


def test_model_repository_api_is_closed(triton_server, client, good_image):
    """Nobody can unload (or load) models over the API: the launcher restricts it to a key it never hands out."""
    import tritonclient.grpc as grpcclient

    for path in ("/v2/repository/models/boot_txt2img/unload", "/v2/repository/index"):
        status, text = post(triton_server.http_url, path, b"{}")
        assert status == 403, (path, status, text)
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        with pytest.raises(Exception, match="This protocol is restricted, expecting header"):
            c.unload_model("boot_txt2img")
    assert_still_serving(client, good_image)


def test_huge_prompt_is_refused_before_tokenizing(client, good_image):
    with pytest.raises(RequestError, match=r"PROMPT is 1048576 bytes; at most 4096 bytes are accepted") as err:
        client.generate(["a" * 2**20], [0])
    assert err.value.status == "400"
    assert_still_serving(client, good_image)


def test_prompt_just_under_the_byte_cap_gets_the_token_error(client):
    with pytest.raises(RequestError, match="tokens long"):
        client.generate(["red " * 1000], [0])


# --------------------------------------------------------------------------------------------
# CLIs given broken files
# --------------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


def test_distill_run_teacher_with_corrupt_weights(tiny, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(tiny, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = cli("-m", "distill.run", "--teacher", str(broken), "--num-prompts", "4", "--work", str(tmp_path / "w"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"cannot load the teacher from {broken}" in proc.stderr and "unet" in proc.stderr


def test_distill_run_teacher_with_missing_weights(tiny, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(tiny, broken)
    next((broken / "vae").glob("*.safetensors")).unlink()
    proc = cli("-m", "distill.run", "--teacher", str(broken), "--num-prompts", "4", "--work", str(tmp_path / "w"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot load the teacher from {broken}" in proc.stderr and "vae" in proc.stderr


def test_distill_run_prompt_file_with_blank_and_very_long_lines(tiny, tmp_path):
    from distill import loading

    long_line = "a red circle " * 40
    (tmp_path / "p.txt").write_text(f"a red circle\n\n   \n{long_line}\na blue square\n")
    prompts = loading.read_prompts(tmp_path / "p.txt")
    assert prompts == ["a red circle", long_line.strip(), "a blue square"]
    argv = ["--teacher", str(tiny), "--prompts", str(tmp_path / "p.txt"), "--steps", "1", "--batch-size", "2",
            "--max-minutes", "0", "--sample-every", "0", "--eval-n", "0", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "s")]
    proc = cli("-m", "distill.run", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 3 prompts are longer than the text encoder's 16 tokens (p.txt line 4)" in proc.stderr
    assert "truncated" in proc.stderr


def test_export_refuses_a_student_folder_with_corrupt_weights(tiny, tmp_path):
    from tests.tiny import make_tiny_student

    student = make_tiny_student(tiny, tmp_path / "student")
    weights = next((student / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\0" * 64)
    proc = cli("-m", "boot_serve.export", "--student", str(student), "--repository", str(tmp_path / "repo"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot load the student from {student}" in proc.stderr
    assert not (tmp_path / "repo" / "boot_unet").exists()


def test_serve_refuses_a_repository_with_a_missing_model_file(exported_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported_repository, repo)
    (repo / "boot_unet" / "1" / "model.onnx").unlink()
    proc = cli("-m", "boot_serve.serve", "--repository", str(repo), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "boot_unet/1/model.onnx is missing" in proc.stderr


def test_client_cli_bad_arguments(tmp_path):
    proc = cli("-m", "boot_serve.client", "a red circle", "--seed", "zero", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "invalid int value: 'zero'" in proc.stderr
    proc = cli("-m", "boot_serve.client", "a red circle", "--url", "127.0.0.1:1", "--out", str(tmp_path / "x.png"),
               timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # 1 = request rejected
    assert "no Triton server answers at http://127.0.0.1:1" in proc.stderr


# --------------------------------------------------------------------------------------------
# Faults: the server dies and comes back
# --------------------------------------------------------------------------------------------
def test_server_killed_then_restarted_client_recovers(exported_repository):
    """kill -9 of tritonserver: the same Client gets a clear connection error (not a hang, not a
    stack trace from deep inside tritonclient) while it is down, and works again after a restart
    on the same ports."""
    import signal

    from boot_serve.client import ServerUnavailableError
    from boot_serve.triton_process import find_free_ports
    from boot_serve.triton_server import TritonServer

    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), find_free_ports(*["127.0.0.1"] * 3)))
    first = TritonServer(exported_repository, exit_timeout=5, **ports).start()
    clients = [Client(first.http_url, "http", timeout=30), Client(first.grpc_url, "grpc", timeout=30)]
    try:
        before = [np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]) for c in clients]
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        for c in clients:
            with pytest.raises(ServerUnavailableError, match="no Triton server answers"):
                c.generate([GOOD[0]], [GOOD[1]])
    finally:
        first.stop()
    with TritonServer(exported_repository, exit_timeout=5, **ports):
        for c, image in zip(clients, before):
            assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), image)
    for c in clients:
        c.close()


def test_grpc_client_reconnects_at_once_after_a_quick_restart():
    """A server back on the same port within gRPC's reconnect backoff (about a second after the
    failed call): the Client's next probe answers at once. gRPC shares connections between
    channels to one address unless told not to, so a rebuilt channel would inherit the backoff
    and report "connection refused" from a live server (the cause of an intermittent failure of
    the test above under CPU load). A stand-in server answers the two calls ready() makes."""
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2

    from boot_serve.triton_process import find_free_port

    def handler(request_type, response):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: response,
                                                   request_deserializer=request_type.FromString,
                                                   response_serializer=type(response).SerializeToString)

    port = find_free_port()

    def start():
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ServerLive": handler(service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse(live=True)),
            "ModelReady": handler(service_pb2.ModelReadyRequest, service_pb2.ModelReadyResponse(ready=True)),
        }),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server

    server = start()
    client = Client(f"127.0.0.1:{port}", "grpc", timeout=10)
    try:
        assert client.ready()
        server.stop(grace=None).wait()
        assert not client.ready()
        server = start()
        assert client.ready()
    finally:
        server.stop(grace=None)
        client.close()


# --------------------------------------------------------------------------------------------
# Soak (boot_serve.soak): a short run by default, the 10-minute one with -m slow
# --------------------------------------------------------------------------------------------
def test_tree_rss_counts_children():
    from boot_serve.soak import tree_rss_mb

    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while tree_rss_mb(child.pid) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        alone = tree_rss_mb(child.pid)
        assert alone >= 200
        assert tree_rss_mb(os.getpid()) >= alone  # the child is counted with its parent
    finally:
        child.kill()
        child.wait()


def run_soak(server, minutes: float, windows: int, out: Path) -> dict:
    proc = cli("-m", "boot_serve.soak", "--url", server.http_url, "--minutes", str(minutes), "--windows",
               str(windows), "--concurrency", "8", "--pid", str(server.process.pid), "--out", str(out),
               timeout=minutes * 60 + 300)
    report = json.loads((out / "soak.json").read_text())
    print(f"\n{(out / 'soak.md').read_text()}")
    assert (out / "soak.png").stat().st_size > 0
    assert proc.returncode == (0 if report["verdicts"]["ok"] else 1), proc.stderr[-2000:]
    return report


def test_short_soak(triton_server, tmp_path):
    report = run_soak(triton_server, 0.5, 2, tmp_path / "soak")
    v = report["verdicts"]
    assert v["errors"]["total"] == 0 and v["requests"] > 0
    assert all(r["rss_mb"] > 0 for r in report["windows"])


@pytest.mark.slow
def test_soak_10_minutes_at_concurrency_8(triton_server, tmp_path):
    out = Path(os.environ.get("BOOT_SOAK_OUT", tmp_path / "soak"))
    report = run_soak(triton_server, float(os.environ.get("BOOT_SOAK_MINUTES", "10")), 10, out)
    assert report["verdicts"]["ok"], report["verdicts"]
