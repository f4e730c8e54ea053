"""The gRPC guard (boot_serve.grpc_guard) in front of a scripted upstream, where a test needs Triton to hang
or to report what reached it: what Triton gets, idle and long-lived streams, unanswered stream requests,
global and stream caps, deadlines on a hung upstream; client addresses; the old constructor form.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2

from boot_serve import access, grpc_policy
from boot_serve.grpc_guard import GrpcGuard
from boot_serve.grpc_policy import TRITON_KEY_METADATA, client_address
from tests.grpc_guard_helpers import KEY, MODEL, _held_stream, _stream_error, call, infer_request, path


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
# What Triton gets
# --------------------------------------------------------------------------------------------
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
# Streams
# --------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("where", ["inputs", "outputs"])
def test_tensors_in_shared_memory_are_refused_before_triton(where):
    request = service_pb2.ModelInferRequest(model_name="boot_txt2img")
    tensor = getattr(request, where).add(name="SEED")
    tensor.parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(grpc_policy.Refused, match="shared memory is closed") as err:
        grpc_policy.reserialize("ModelInfer", request.SerializeToString(), ("boot_txt2img",))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    tensor.parameters.clear()
    assert grpc_policy.reserialize("ModelInfer", request.SerializeToString(), ("boot_txt2img",))
