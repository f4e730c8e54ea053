"""The gRPC guard (boot_serve.grpc_guard) against hostile calls, in front of a real tritonserver started
with the shared access policy's restriction flags (boot_serve.access). (In front of a scripted upstream,
where a test needs Triton to hang or to report what reached it: test_grpc_guard_upstream.py.)
"""

from __future__ import annotations

import queue
import socket
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from boot_serve import access
from boot_serve.client import Client, ServerUnavailableError
from boot_serve.grpc_guard import GrpcGuard
from boot_serve.grpc_policy import TRITON_KEY_METADATA
from tests.grpc_guard_helpers import (
    COMPOSING,
    GOOD,
    KEY,
    MODEL,
    _held_stream,
    _inputs,
    _stream_error,
    call,
    image_of,
    infer_request,
    path,
    status_of,
)


# --------------------------------------------------------------------------------------------
# Fixtures: Triton with the restriction flags, the reference image, a guard in front
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton(exported_repository, tmp_path_factory):
    from boot_serve.triton_server import TritonServer

    log = tmp_path_factory.mktemp("tritonserver-grpc-guard") / "tritonserver.log"
    server = TritonServer(exported_repository, exit_timeout=5, log_path=log, operator_key=KEY)
    server.start()
    server.first_pid = server.process.pid
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(triton) -> np.ndarray:
    with Client(triton.grpc_url, "grpc") as c:
        return np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0])


@pytest.fixture(scope="module")
def guard(triton):
    """The guard as the service runs it (the served model only, the operator key), with a short stream
    idle timeout for the test."""
    with GrpcGuard(triton.grpc_url, models=(MODEL,), operator_key=KEY, stream_idle_s=1.0) as g:
        yield g


# --------------------------------------------------------------------------------------------
# What passes
# --------------------------------------------------------------------------------------------
def test_a_good_call_gives_the_same_image_as_triton_itself(guard, triton, reference):
    with Client(guard.url, "grpc") as c:
        assert c.ready()
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
    with grpcclient.InferenceServerClient(guard.url) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
        assert c.get_server_metadata().name == "triton"
        assert c.get_model_metadata(MODEL).name == MODEL
        assert c.get_model_config(MODEL).config.name == MODEL
        assert np.array_equal(c.infer(MODEL, _inputs(*GOOD)).as_numpy("IMAGE")[0], reference)


# --------------------------------------------------------------------------------------------
# Refused before Triton
# --------------------------------------------------------------------------------------------
CLOSED_CALLS = {
    "system_shm_register": lambda c, h: c.register_system_shared_memory("r", "/boot_shm", 64, headers=h),
    "system_shm_status": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "system_shm_unregister": lambda c, h: c.unregister_system_shared_memory(headers=h),
    "cuda_shm_status": lambda c, h: c.get_cuda_shared_memory_status(headers=h),
    "repository_index": lambda c, h: c.get_model_repository_index(headers=h),
    "repository_load": lambda c, h: c.load_model(COMPOSING, headers=h),
    "repository_unload": lambda c, h: c.unload_model(MODEL, headers=h),
    "trace": lambda c, h: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, headers=h),
    "log_settings": lambda c, h: c.update_log_settings({"log_verbose_level": 2}, headers=h),
}


@pytest.mark.parametrize("name", list(CLOSED_CALLS))
def test_control_methods_are_closed(guard, triton, name):
    """Refused by the guard (PERMISSION_DENIED and its message; Triton would say UNAVAILABLE,
    "restricted"), with or without the operator key; the model stays loaded."""
    with grpcclient.InferenceServerClient(guard.url) as c:
        for headers in (None, {access.KEY_HEADER: KEY}):
            t = time.perf_counter()
            with pytest.raises(InferenceServerException) as err:
                CLOSED_CALLS[name](c, headers)
            assert time.perf_counter() - t < 1.0
            assert status_of(err.value) == "StatusCode.PERMISSION_DENIED", err.value
            assert "is closed on this server" in err.value.message(), err.value
    with grpcclient.InferenceServerClient(triton.grpc_url) as direct:
        assert direct.is_model_ready(MODEL)


def test_triton_itself_restricts_the_same_methods(triton):
    """The second lock: Triton's own endpoint refuses a closed method and keyless statistics."""
    with grpcclient.InferenceServerClient(triton.grpc_url) as direct:
        for attempt in (direct.get_model_repository_index, direct.get_inference_statistics,
                        lambda: direct.get_model_repository_index(headers={TRITON_KEY_METADATA: KEY})):
            with pytest.raises(InferenceServerException, match="restricted"):
                attempt()
        assert direct.get_inference_statistics(MODEL, headers={TRITON_KEY_METADATA: KEY}).model_stats


@pytest.mark.parametrize("method", [
    "/inference.GRPCInferenceService/modelinfer", "/inference.GRPCInferenceService/ModelInfer/",
    "//inference.GRPCInferenceService/ModelInfer", "/inference.grpcinferenceservice/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryIndex ", "/inference.GRPCInferenceService/",
    "/inference.GRPCInferenceService", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Check", "/inference.GRPCInferenceService/ModelInfer?x=1",
])
def test_unknown_and_oddly_spelled_methods_are_unimplemented(guard, method):
    with grpc.insecure_channel(guard.url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(method)(infer_request().SerializeToString(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "unknown method" in err.value.details()


def test_statistics_need_the_operator_key(guard, triton):
    request = service_pb2.ModelStatisticsRequest(name=MODEL)
    for metadata in ((), ((access.KEY_HEADER, "wrong"),), ((access.KEY_HEADER, KEY[:-1]),),
                     ((access.KEY_HEADER, KEY), (TRITON_KEY_METADATA, KEY)), (("boot-operator-key-x", KEY),)):
        code, details = call(guard.url, "ModelStatistics", request, metadata)
        assert code == grpc.StatusCode.PERMISSION_DENIED and access.KEY_HEADER in details, (metadata, code, details)
    with grpcclient.InferenceServerClient(guard.url) as c:
        for header in (access.KEY_HEADER, TRITON_KEY_METADATA):
            stats = c.get_inference_statistics(MODEL, headers={header: KEY})
            assert [s.name for s in stats.model_stats] == [MODEL]
        assert MODEL in {s.name for s in c.get_inference_statistics(headers={access.KEY_HEADER: KEY}).model_stats}
        with pytest.raises(InferenceServerException) as err:
            c.get_inference_statistics(COMPOSING, headers={access.KEY_HEADER: KEY})
        assert status_of(err.value) == "StatusCode.NOT_FOUND" and "is not served here" in err.value.message()
    with GrpcGuard(triton.grpc_url, models=(MODEL,)) as keyless:  # no operator key configured: closed
        assert call(keyless.url, "ModelStatistics", request, ((access.KEY_HEADER, KEY),))[0] == \
            grpc.StatusCode.PERMISSION_DENIED


def test_models_that_are_not_served_are_not_found(guard, triton):
    requests = lambda name: (("ModelInfer", infer_request(name)),
                             ("ModelReady", service_pb2.ModelReadyRequest(name=name)),
                             ("ModelMetadata", service_pb2.ModelMetadataRequest(name=name)),
                             ("ModelConfig", service_pb2.ModelConfigRequest(name=name)))
    for name in (COMPOSING, "nope", ""):
        for method, request in requests(name):
            code, details = call(guard.url, method, request)
            assert code == grpc.StatusCode.NOT_FOUND and f"model {name!r} is not served here" in details, \
                (method, code, details)
    # The model Triton serves, behind a guard told to serve another one: hidden by the guard alone.
    with GrpcGuard(triton.grpc_url, models=("other",)) as other:
        for method, request in requests(MODEL):
            assert call(triton.grpc_url, method, request)[0] == grpc.StatusCode.OK
            code, details = call(other.url, method, request)
            assert code == grpc.StatusCode.NOT_FOUND and repr(MODEL) in details, (method, code, details)


@pytest.mark.parametrize("data", [b"\xff" * 16, b"garbage", b"\x0a\x02\xff\xfe", b"\x0a\x80"],
                         ids=["bad_wire_type", "garbage", "invalid_utf8", "truncated"])
def test_unparsable_messages_are_invalid_argument(guard, data):
    code, details = call(guard.url, "ModelInfer", data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in details
    with grpc.insecure_channel(guard.url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(channel.stream_stream(path("ModelStreamInfer"))(iter([data]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_messages_over_the_limit_are_refused_compressed_or_not(guard):
    """Over 1 MiB: refused from the length prefix, and from the inflated size when gzip-compressed (1 MiB
    of "x" gzips to ~1 KB, under the limit as sent)."""
    big = infer_request(prompt="x" * (1 << 20)).SerializeToString()
    with grpc.insecure_channel(guard.url) as channel:
        for compression in (None, grpc.Compression.Gzip):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(path("ModelInfer"))(big, timeout=10, compression=compression)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (compression, err.value)
            assert f"vs. {1 << 20}" in err.value.details(), err.value.details()


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------
def test_a_stream_infers_and_an_idle_stream_is_closed(guard, reference):
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(guard.url) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        for _ in range(2):
            c.async_stream_infer(MODEL, _inputs(*GOOD))
        for _ in range(2):
            result, error = results.get(timeout=60)
            assert error is None and np.array_equal(result.as_numpy("IMAGE")[0], reference)
        t = time.monotonic()
        result, error = results.get(timeout=10)  # then nothing is sent: closed after stream_idle_s
        closed_after = time.monotonic() - t
        c.stop_stream()
    assert result is None and "DEADLINE_EXCEEDED" in str(error.status()) and "for 1 s" in error.message(), error
    assert 0.5 < closed_after < 3.0, closed_after


def test_a_stream_naming_an_unserved_model_is_closed_not_found(guard):
    with grpc.insecure_channel(guard.url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(channel.stream_stream(path("ModelStreamInfer"))(
                iter([infer_request().SerializeToString(), infer_request(COMPOSING).SerializeToString()]),
                timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"model {COMPOSING!r} is not served here" in err.value.details()


# --------------------------------------------------------------------------------------------
# Exhaustion: per-address caps; Triton down
# --------------------------------------------------------------------------------------------
def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="needs a second client address: ::1 beside 127.0.0.1")
def test_one_address_over_its_cap_is_refused_while_another_is_served(triton, reference):
    """Two streams from 127.0.0.1 hold its two slots (each did a real inference first); a third call
    from there gets RESOURCE_EXHAUSTED, one from ::1 (same guard, dual-stack) is served."""
    with GrpcGuard(triton.grpc_url, host="::", models=(MODEL,), max_calls_per_client=2,
                   max_streams_per_client=2, stream_idle_s=30) as g:
        v4, v6 = f"127.0.0.1:{g.port}", f"[::1]:{g.port}"
        with grpc.insecure_channel(v4) as channel:
            held = [_held_stream(channel) for _ in range(2)]
            for requests, stream_call in held:
                requests.put(infer_request().SerializeToString())
                response = service_pb2.ModelStreamInferResponse.FromString(next(stream_call))
                assert np.array_equal(image_of(response.infer_response)[0], reference)
            assert g.in_flight() == {"calls": 2, "streams": 2, "clients": 1}
            t = time.perf_counter()
            code, details = call(v4, "ServerLive")
            refused_s = time.perf_counter() - t
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "127.0.0.1 has 2 calls in flight" in details
            assert refused_s < 0.5
            with Client(v6, "grpc", timeout=60) as c:
                assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
            for requests, stream_call in held:
                requests.put(None)
                assert list(stream_call) == []
        assert call(v4, "ServerLive")[0] == grpc.StatusCode.OK  # the slots came back


def test_triton_down_fails_at_once_with_unavailable(triton, reference):
    with GrpcGuard(triton.grpc_url, models=(MODEL,)) as g, Client(g.url, "grpc", timeout=30) as c:
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
        g.set_upstream(None)
        assert g.channel() is None  # nothing to connect with
        t = time.perf_counter()
        code, details = call(g.url, "ServerLive")
        assert time.perf_counter() - t < 0.5
        assert code == grpc.StatusCode.UNAVAILABLE and "not serving" in details
        with pytest.raises(ServerUnavailableError):
            c.generate([GOOD[0]], [GOOD[1]])
        with grpc.insecure_channel(g.url) as channel:
            assert _stream_error(_held_stream(channel)[1]).code() == grpc.StatusCode.UNAVAILABLE
        g.set_upstream(None, "tritonserver died 6 times; this service gave up")
        assert call(g.url, "ModelReady", service_pb2.ModelReadyRequest(name=MODEL)) == \
            (grpc.StatusCode.UNAVAILABLE, "tritonserver died 6 times; this service gave up")
        g.upstream = triton.grpc_url  # the attribute form sets it too
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)


# --------------------------------------------------------------------------------------------
# After everything above
# --------------------------------------------------------------------------------------------
def test_triton_kept_its_process_and_serves_the_same_image(triton, guard, reference):
    assert triton.is_running() and triton.process.pid == triton.first_pid
    with Client(guard.url, "grpc") as c:
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
