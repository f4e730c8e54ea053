"""The gRPC guard (boot_serve.grpc_guard) against hostile calls, in front of a real tritonserver started
with the shared access policy's restriction flags (boot_serve.access), and in front of a scripted
upstream where a test needs Triton to hang or to report what reached it.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from boot_serve import access
from boot_serve.client import Client, ServerUnavailableError
from boot_serve.grpc_guard import GrpcGuard
from boot_serve.grpc_policy import SERVICE, TRITON_KEY_METADATA, client_address

MODEL = "boot_txt2img"
COMPOSING = "boot_unet"  # a model folder of the exported repository that clients may not reach
GOOD = ("a red circle", 0)
KEY = access.new_key()


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def call(url: str, method: str, request: bytes | object = b"", metadata=(), timeout: float | None = 30):
    """One raw unary call: (status code, details or response bytes)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(url) as channel:
        try:
            return grpc.StatusCode.OK, channel.unary_unary(path(method))(data, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), err.details()


def _inputs(prompt: str, seed: int) -> list:
    prompt_in = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt_in.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    seed_in = grpcclient.InferInput("SEED", [1, 1], "INT64")
    seed_in.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
    return [prompt_in, seed_in]


def infer_request(model: str = MODEL, prompt: str = GOOD[0], seed: int = GOOD[1]) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest tritonclient sends for one prompt."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for item in _inputs(prompt, seed):
        request.inputs.extend([item._get_tensor()])
        request.raw_input_contents.extend([item._get_content()])
    return request


def image_of(response: service_pb2.ModelInferResponse) -> np.ndarray:
    return grpcclient.InferResult(response).as_numpy("IMAGE")


def status_of(err: InferenceServerException) -> str:
    return err.status() or ""


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
# A scripted upstream: records what reaches it; ModelInfer hangs while `hold` is set
# --------------------------------------------------------------------------------------------
class FakeTriton(grpc.GenericRpcHandler):
    def __init__(self):
        self.seen: queue.Queue = queue.Queue()  # (method, request bytes, metadata, time_remaining)
        self.hold = threading.Event()
        self.cancelled = threading.Event()
        self.stream_requests: queue.Queue = queue.Queue()
        self.answer = threading.Semaphore(0)  # one stream answer per release
        self.server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[self])
        self.url = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details):
        if details.method == path("ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(self._stream)
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(details.method, req, ctx))

    def _unary(self, method, request, context):
        self.seen.put((method, request, dict(context.invocation_metadata()), context.time_remaining()))
        while self.hold.is_set():
            if not context.is_active():
                self.cancelled.set()
                return b""
            time.sleep(0.02)
        return b""

    def _stream(self, requests, context):
        """One answer per `answer.release()`; ends once the requests ended and no answer is due."""
        ended = threading.Event()

        def read():
            try:
                for r in requests:
                    self.stream_requests.put(r)
            except grpc.RpcError:  # the guard closed the stream
                pass
            ended.set()
        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            if self.answer.acquire(timeout=0.05):
                yield service_pb2.ModelStreamInferResponse(
                    infer_response=service_pb2.ModelInferResponse(model_name=MODEL)).SerializeToString()
            elif ended.is_set():
                return

    def stop(self):
        self.hold.clear()
        self.server.stop(0)


@pytest.fixture
def fake():
    f = FakeTriton()
    yield f
    f.stop()


# --------------------------------------------------------------------------------------------
# What passes, and what Triton gets
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


def test_triton_gets_only_the_reparsed_message_the_canonical_path_and_harmless_metadata(fake):
    with GrpcGuard(fake.url, models=(MODEL,), call_deadline_s=7.0) as g:
        request = infer_request()
        extra = b"\x98\x07\x01"  # field 115 (not in the protocol), varint 1
        hostile = [(access.KEY_HEADER, KEY), ("x-forwarded-for", "10.0.0.1"), ("triton_grpc_error", "true")]
        code, _ = call(g.url, "ModelInfer", request.SerializeToString() + extra, metadata=hostile, timeout=None)
        assert code == grpc.StatusCode.OK
        method, data, metadata, remaining = fake.seen.get(timeout=5)
        assert method == path("ModelInfer") and data == request.SerializeToString()
        assert service_pb2.ModelInferRequest.FromString(data) == request
        assert not {access.KEY_HEADER, TRITON_KEY_METADATA, "x-forwarded-for", "triton_grpc_error"} & set(metadata)
        assert 6.0 < remaining <= 7.1  # no deadline from the caller: the guard's own
        assert call(g.url, "ServerLive", timeout=3)[0] == grpc.StatusCode.OK
        assert fake.seen.get(timeout=5)[3] <= 3.1  # the caller's deadline goes along
        assert fake.seen.empty()
    with GrpcGuard(fake.url, models=(MODEL,), operator_key=KEY, max_call_deadline_s=2.0) as g:
        request = service_pb2.ModelStatisticsRequest(name=MODEL)
        assert call(g.url, "ModelStatistics", request, [(access.KEY_HEADER, KEY)])[0] == grpc.StatusCode.OK
        method, data, metadata, remaining = fake.seen.get(timeout=5)
        assert metadata.get(TRITON_KEY_METADATA) == KEY and access.KEY_HEADER not in metadata
        assert remaining <= 2.1  # a longer deadline from the caller (30 s) is cut


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


def _held_stream(channel):
    """A ModelStreamInfer call whose requests the test feeds: (queue to put bytes or None, call)."""
    requests: queue.Queue = queue.Queue()

    def feed():
        while (item := requests.get()) is not None:
            yield item
    return requests, channel.stream_stream(path("ModelStreamInfer"))(feed())


def _stream_error(stream_call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream_call:
            pass
    return err.value


def test_idle_streams_free_their_slots_and_threads(fake):
    with GrpcGuard(fake.url, models=(MODEL,), stream_idle_s=0.5, max_streams_per_client=3) as g, \
            grpc.insecure_channel(g.url) as channel:
        threads = _threads()
        for _ in range(2):  # the second round opens as many again: the first freed its slots
            held = [_held_stream(channel) for _ in range(3)]
            t = time.monotonic()
            for _, stream_call in held:
                err = _stream_error(stream_call)
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "for 0.5 s" in err.details()
            assert time.monotonic() - t < 2.0
            assert g.in_flight() == {"calls": 0, "streams": 0, "clients": 0}
            for requests, _ in held:
                requests.put(None)
        deadline = time.monotonic() + 5
        while _threads() != threads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _threads() == threads  # no thread left behind (the guard's pool workers aside)


def _threads() -> list[str]:
    """Threads other than the pools' workers (those are reused, at most `workers`)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith(("boot-grpc-guard_",
                                                                                 "ThreadPoolExecutor")))


def test_a_stream_is_closed_after_its_lifetime_however_busy(fake):
    with GrpcGuard(fake.url, models=(MODEL,), stream_idle_s=10, stream_lifetime_s=1.0) as g, \
            grpc.insecure_channel(g.url) as channel:
        requests, stream_call = _held_stream(channel)
        answers, t = 0, time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in range(100):
                requests.put(infer_request().SerializeToString())
                fake.answer.release()
                next(stream_call)
                answers += 1
                time.sleep(0.1)
        requests.put(None)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "open for 1 s" in err.value.details()
    assert answers >= 5 and 0.9 < time.monotonic() - t < 2.5


def test_a_stream_waits_for_answers_before_sending_more(fake):
    """Requests Triton has not answered are capped per stream: the guard reads the next only when an
    answer comes back, so one stream cannot queue unbounded work."""
    with GrpcGuard(fake.url, models=(MODEL,), stream_pending=2) as g, grpc.insecure_channel(g.url) as channel:
        requests, stream_call = _held_stream(channel)
        for _ in range(5):
            requests.put(infer_request().SerializeToString())
        time.sleep(0.5)
        assert fake.stream_requests.qsize() == 2
        fake.answer.release()
        next(stream_call)
        time.sleep(0.3)
        assert fake.stream_requests.qsize() == 3
        for _ in range(4):
            fake.answer.release()
            next(stream_call)
        assert fake.stream_requests.qsize() == 5
        requests.put(None)


# --------------------------------------------------------------------------------------------
# Exhaustion: caps, deadlines
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


def test_global_and_stream_caps(fake):
    fake.hold.set()
    with GrpcGuard(fake.url, models=(MODEL,), max_calls=3, max_streams=1) as g:
        with grpc.insecure_channel(g.url) as channel:
            requests, stream_call = _held_stream(channel)
            requests.put(infer_request().SerializeToString())
            fake.answer.release()
            next(stream_call)  # the one stream allowed is open
            err = _stream_error(_held_stream(channel)[1])
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 streams open" in err.details()
            pending = [channel.unary_unary(path("ModelInfer")).future(infer_request().SerializeToString())
                       for _ in range(2)]
            for _ in pending:
                fake.seen.get(timeout=5)  # both reached the (hanging) upstream: 3 calls in flight
            code, details = call(g.url, "ServerLive")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the server has 3 calls in flight" in details
            fake.hold.clear()
            assert [f.result(timeout=10) for f in pending] == [b"", b""]
            requests.put(None)
            list(stream_call)
        assert call(g.url, "ServerLive")[0] == grpc.StatusCode.OK
        assert fake.seen.qsize() == 1  # the refused calls never reached the upstream


def test_a_hung_upstream_call_ends_at_the_guards_deadline(fake):
    fake.hold.set()
    with GrpcGuard(fake.url, models=(MODEL,), call_deadline_s=0.5) as g:
        t = time.monotonic()
        code, details = call(g.url, "ModelInfer", infer_request(), timeout=None)
        took = time.monotonic() - t
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.5 s" in details, (code, details)
        assert 0.4 < took < 2.0
        assert fake.cancelled.wait(5)  # the upstream call was given up, not left running
        assert g.in_flight()["calls"] == 0


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


@pytest.mark.parametrize("peer, address", [
    ("ipv4:127.0.0.1:5555", "127.0.0.1"), ("ipv6:[::1]:5555", "::1"), ("ipv6:%5B::1%5D:5555", "::1"),
    ("ipv6:[::ffff:10.1.2.3]:80", "10.1.2.3"), ("unix:/tmp/sock", "unix"),
])
def test_client_addresses(peer, address):
    assert client_address(peer) == address


def test_the_old_constructor_form_and_repeated_stops(fake):
    g = GrpcGuard(fake.url, "127.0.0.1", 0, 4096, 4).start()  # (upstream, host, port, max_message_bytes, workers)
    assert g.upstream == fake.url and g.port > 0 and g.url == f"127.0.0.1:{g.port}"
    assert call(g.url, "ServerLive")[0] == grpc.StatusCode.OK
    assert call(g.url, "ModelInfer", infer_request(prompt="x" * 5000))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    g.stop()
    g.stop()
    assert call(g.url, "ServerLive", timeout=2)[0] == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------------
# After everything above
# --------------------------------------------------------------------------------------------
def test_triton_kept_its_process_and_serves_the_same_image(triton, guard, reference):
    assert triton.is_running() and triton.process.pid == triton.first_pid
    with Client(guard.url, "grpc") as c:
        assert np.array_equal(np.asarray(c.generate([GOOD[0]], [GOOD[1]])[0]), reference)
