"""The gRPC side of the guard: a gRPC server in front of Triton's gRPC endpoint that lets through
only what a client of the service needs, checked (boot_serve.grpc_policy), and bounds what one client
can hold (boot_serve.grpc_admission).

Why a receive limit: Triton 2.51 accepts gRPC messages up to 2 GB and has no flag to lower that;
each refused 64 MiB request left ~250 MB more resident in the server and its Python-backend stub
(measured on the 2-core CPU machine: 504 -> 1545 MB after four), memory it keeps. gRPC's own
receive limit (`grpc.max_receive_message_length`) fails such a call with RESOURCE_EXHAUSTED from
the message's length prefix, so the body is never held here nor sent on.

Triton gets each allowed call under its canonical method path, with the deadline and the metadata
the policy forwards; Triton's answers to allowed calls (status codes and messages included) come
back unchanged.

While Triton is not serving (`set_upstream(None)`: restarting after a crash, or given up on)
every allowed call fails at once with UNAVAILABLE, which boot_serve.client reports as
ServerUnavailableError; calls made while a restarted Triton is not yet answering fail the same
way, from gRPC.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from boot_serve.grpc_admission import (
    CALL_DEADLINE_S,
    CONNECTION_IDLE_S,
    MAX_CALL_DEADLINE_S,
    MAX_CALLS,
    MAX_CALLS_PER_CLIENT,
    MAX_STREAMS,
    MAX_STREAMS_PER_CLIENT,
    MAX_STREAMS_PER_CONNECTION,
    STREAM_IDLE_S,
    STREAM_LIFETIME_S,
    STREAM_PENDING,
    WORKERS,
    Admission,
    Stream,
)
from boot_serve.grpc_policy import (
    CLOSED_METHODS,
    OPERATOR_METHODS,
    PUBLIC_METHODS,
    SERVICE,
    STREAM_METHODS,
    Refused,
    check_operator,
    client_address,
    forwarded_metadata,
    reserialize,
)
from boot_serve.guard_limits import MAX_BODY_BYTES

# The guard pings idle-looking connections to find dead peers; clients may ping no more often
# than every 10 s without data (tritonclient's default is never), two strikes close the connection.
SERVER_OPTIONS = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                  ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                  ("grpc.http2.max_ping_strikes", 2), ("grpc.so_reuseport", 0),
                  ("grpc.max_send_message_length", -1)]
# Reconnect to a restarted Triton within a second, not after gRPC's default backoff of up to 2 min.
UPSTREAM_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
                    ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
DOWN_MESSAGE = "Triton is not serving right now (restarting, or stopped); retry shortly"


class GrpcGuard:
    """Listens on (host, port) (port 0: a free one, then in `.port`), forwards to `upstream` "host:port".

    `models`: the model names served (None: any); `operator_key`: the key that opens ModelStatistics
    (None: closed to everyone). The other keywords override the module constants of the same names.
    """

    def __init__(self, upstream: str | None, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = MAX_BODY_BYTES, workers: int = WORKERS, *,
                 models: tuple[str, ...] | None = None, operator_key: str | None = None,
                 max_calls: int = MAX_CALLS, max_calls_per_client: int = MAX_CALLS_PER_CLIENT,
                 max_streams: int = MAX_STREAMS, max_streams_per_client: int = MAX_STREAMS_PER_CLIENT,
                 call_deadline_s: float = CALL_DEADLINE_S, max_call_deadline_s: float = MAX_CALL_DEADLINE_S,
                 stream_idle_s: float = STREAM_IDLE_S, stream_lifetime_s: float = STREAM_LIFETIME_S,
                 stream_pending: int = STREAM_PENDING,
                 max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
                 connection_idle_s: float = CONNECTION_IDLE_S):
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.workers = workers
        self.models = None if models is None else tuple(models)
        self.operator_key = operator_key
        self.max_calls, self.max_calls_per_client = max_calls, max_calls_per_client
        self.max_streams, self.max_streams_per_client = max_streams, max_streams_per_client
        self.call_deadline_s, self.max_call_deadline_s = call_deadline_s, max_call_deadline_s
        self.stream_idle_s, self.stream_lifetime_s = stream_idle_s, stream_lifetime_s
        self.stream_pending = stream_pending
        self.max_streams_per_connection = max_streams_per_connection
        self.connection_idle_s = connection_idle_s
        self._server = None
        self._channel = None
        self._target = None
        self._upstream = upstream
        self.down_reason = DOWN_MESSAGE
        self._lock = threading.Lock()
        self._admission = Admission(self)
        self._streams: set[Stream] = set()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # upstream ----------------------------------------------------------------------------------
    @property
    def upstream(self) -> str | None:
        """Triton's gRPC "host:port"; None while Triton is not serving."""
        return self._upstream

    @upstream.setter
    def upstream(self, url: str | None) -> None:
        self.set_upstream(url)

    def set_upstream(self, url: str | None, reason: str | None = None) -> None:
        """Forward to `url` ("host:port") from now on; None: Triton is down, and every allowed call
        fails at once with UNAVAILABLE and `reason` (or DOWN_MESSAGE) without connecting anywhere."""
        with self._lock:
            self._upstream = url
            self.down_reason = reason or DOWN_MESSAGE
            old = None
            if url is None or url != self._target:
                old, self._channel, self._target = self._channel, None, None
        if old is not None:
            old.close()

    def channel(self):
        """The channel to Triton (rebuilt when `upstream` changes); None while Triton is down."""
        with self._lock:
            if self._upstream is None:
                return None
            if self._target != self._upstream:
                old, self._channel = self._channel, grpc.insecure_channel(self._upstream, options=UPSTREAM_OPTIONS)
                self._target = self._upstream
                if old is not None:
                    old.close()
            return self._channel

    def in_flight(self) -> dict[str, int]:
        """Calls and streams open now (admitted; refused ones are not counted)."""
        with self._admission.lock:
            return {"calls": self._admission.total.calls, "streams": self._admission.total.streams,
                    "clients": len(self._admission.clients)}

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"{host}:{self.port}"

    def start(self) -> GrpcGuard:
        options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_concurrent_streams", self.max_streams_per_connection),
                   ("grpc.max_connection_idle_ms", int(self.connection_idle_s * 1000))]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="boot-grpc-guard"),
            handlers=[_Handler(self)], maximum_concurrent_rpcs=self.workers * 4, options=options)
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._server.add_insecure_port(f"{host}:{self.port}")
        if port == 0:
            raise OSError(f"the gRPC guard cannot listen on {self.host}:{self.port}")
        self.port = port
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch_streams, name="boot-grpc-guard-streams", daemon=True)
        self._watchdog.start()
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the channel to Triton (idempotent)."""
        with self._lock:
            server, channel, watchdog = self._server, self._channel, self._watchdog
            self._server = self._channel = self._target = self._watchdog = None
        self._stopping.set()
        if server is not None:
            for stream in list(self._streams):
                stream.close(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            server.stop(grace=5).wait()
        if watchdog is not None:
            watchdog.join(timeout=5)
        if channel is not None:
            channel.close()

    def __enter__(self) -> GrpcGuard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch_streams(self) -> None:
        """Close streams idle for stream_idle_s or open for stream_lifetime_s."""
        interval = max(0.05, min(1.0, self.stream_idle_s / 10, self.stream_lifetime_s / 10))
        while not self._stopping.wait(interval):
            now = time.monotonic()
            for stream in list(self._streams):
                if now - stream.started >= self.stream_lifetime_s:
                    stream.close(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"the stream was open for {self.stream_lifetime_s:g} s, the most this server "
                                 "allows, and is closed; open a new one")
                elif now - stream.active >= self.stream_idle_s:
                    stream.close(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no message went either way on the stream for {self.stream_idle_s:g} s; "
                                 "it is closed")


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------
def _refuse(code: grpc.StatusCode, message: str):
    """A handler that answers `code` without reading the request (a stream handler reads nothing)."""
    def behaviour(requests, context):
        context.abort(code, message)
    return grpc.stream_stream_rpc_method_handler(behaviour)


def _relay_error(err: grpc.RpcError, context) -> None:
    """Triton's status and message as this call's (context.abort raises)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNAVAILABLE
    context.abort(code, err.details() if hasattr(err, "details") else str(err))


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, guard: GrpcGuard):
        self.guard = guard
        self.allowed = {f"/{SERVICE}/{name}": name for name in (*PUBLIC_METHODS, *OPERATOR_METHODS)}
        self.closed = {f"/{SERVICE}/{name}": name for name in CLOSED_METHODS}

    def service(self, details):
        method = details.method
        name = self.allowed.get(method)
        if name is None:
            if method in self.closed:
                return _refuse(grpc.StatusCode.PERMISSION_DENIED,
                               f"{self.closed[method]} is closed on this server")
            return _refuse(grpc.StatusCode.UNIMPLEMENTED,
                           f"unknown method {method[:200]!r}: this server answers {SERVICE}'s "
                           f"{', '.join(PUBLIC_METHODS)} (and {', '.join(OPERATOR_METHODS)} for operators)")
        if name == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self._stream(requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(name, request, context))

    # checks ------------------------------------------------------------------------------------
    def _check_operator(self, context) -> None:
        check_operator(context.invocation_metadata(), self.guard.operator_key)

    def _parse(self, name: str, data: bytes) -> bytes:
        return reserialize(name, data, self.guard.models)

    def _metadata(self, name: str, context) -> list[tuple[str, str]]:
        return forwarded_metadata(name, context.invocation_metadata(), self.guard.operator_key)

    def _admit(self, context, stream: bool):
        """(channel, release) for an admitted call. `release` frees its slot (idempotent): the handler
        calls it as it ends, before the caller sees the status; gRPC calls it too when the call ends
        any other way (cancelled by the caller)."""
        channel = self.guard.channel()
        if channel is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, self.guard.down_reason)
        client = client_address(context.peer())
        self.guard._admission.take(client, stream)
        released = threading.Lock()

        def release():
            if released.acquire(blocking=False):
                self.guard._admission.give(client, stream)

        if not context.add_callback(release):  # the call ended meanwhile (the caller cancelled)
            release()
            raise Refused(grpc.StatusCode.CANCELLED, "the call was cancelled")
        return channel, release

    def _deadline(self, context) -> float:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e6:
            return self.guard.call_deadline_s
        return min(remaining, self.guard.max_call_deadline_s)

    # unary -------------------------------------------------------------------------------------
    def _unary(self, name: str, request: bytes, context):
        try:
            if name in OPERATOR_METHODS:
                self._check_operator(context)
            data = self._parse(name, request)
            channel, release = self._admit(context, stream=False)
        except Refused as refusal:
            context.abort(refusal.code, refusal.message)
        try:
            return self._forward_unary(name, channel, data, context)
        finally:
            release()

    def _forward_unary(self, name: str, channel, data: bytes, context):
        timeout = self._deadline(context)
        try:
            call = channel.unary_unary(f"/{SERVICE}/{name}").future(
                data, metadata=self._metadata(name, context), timeout=timeout)
        except ValueError:  # the channel was closed by set_upstream meanwhile
            context.abort(grpc.StatusCode.UNAVAILABLE, self.guard.down_reason)
        context.add_callback(call.cancel)  # the caller gave up: so does Triton
        try:
            return call.result()
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and (context.time_remaining() or 1e9) > 0.05:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer from Triton within {timeout:g} s, the most this server waits for one call")
            _relay_error(err, context)
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")

    # stream ------------------------------------------------------------------------------------
    def _stream(self, requests, context):
        guard = self.guard
        try:
            channel, release = self._admit(context, stream=True)
        except Refused as refusal:
            context.abort(refusal.code, refusal.message)
        stream = Stream(guard.stream_pending)

        def ended():  # however the call ended (this handler may never be resumed after a cancel)
            stream.close(grpc.StatusCode.CANCELLED, "the client went away")
            with guard._lock:
                guard._streams.discard(stream)
        if not context.add_callback(ended):
            release()
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")

        def upstream_requests():
            try:
                for raw in requests:
                    stream.touch()
                    try:
                        data = self._parse("ModelStreamInfer", raw)
                    except Refused as refusal:
                        stream.close(refusal.code, refusal.message)
                        return
                    if not stream.wait_for_room():
                        return
                    yield data
            except grpc.RpcError:  # the client's side ended
                stream.close(grpc.StatusCode.CANCELLED, "the client went away")

        remaining = context.time_remaining()
        lifetime = guard.stream_lifetime_s
        timeout = min(remaining, lifetime + 5) if remaining is not None and remaining < 1e6 else lifetime + 5
        with guard._lock:
            guard._streams.add(stream)
        try:
            try:
                call = channel.stream_stream(STREAM_METHODS[0])(
                    upstream_requests(), metadata=self._metadata("ModelStreamInfer", context),
                    timeout=timeout)
            except ValueError:  # the channel was closed by set_upstream meanwhile
                context.abort(grpc.StatusCode.UNAVAILABLE, guard.down_reason)
            stream.attach(call)
            try:
                for response in call:
                    stream.touch()
                    stream.answered()
                    yield response
            except grpc.RpcError as err:
                if stream.reason is not None:
                    context.abort(*stream.reason)
                _relay_error(err, context)
            if stream.reason is not None:
                context.abort(*stream.reason)
        finally:
            with guard._lock:
                guard._streams.discard(stream)
            release()
