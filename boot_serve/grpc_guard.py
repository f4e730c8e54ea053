"""The gRPC side of the guard: a pass-through gRPC server in front of Triton's gRPC endpoint that
refuses messages over a size limit before they are buffered.

Why: Triton 2.51 accepts gRPC messages up to 2 GB and has no flag to lower that; each refused 64 MiB
request left ~250 MB more resident in the server and its Python-backend stub (measured on the
2-core CPU machine: 504 -> 1545 MB after four), memory it keeps. gRPC's own receive limit
(`grpc.max_receive_message_length`) fails such a call with RESOURCE_EXHAUSTED from the message's
length prefix, so the body is never held here nor sent on.

Every method of inference.GRPCInferenceService passes through as raw bytes (no protobuf parsing
here): unary calls one to one, ModelStreamInfer as a stream, with the caller's metadata and
deadline; Triton's status codes and messages come back unchanged. While Triton is not answering
(restarting after a crash) calls fail with UNAVAILABLE, which boot_serve.client reports as
ServerUnavailableError.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from boot_serve.guard import MAX_BODY_BYTES

STREAM_METHODS = ("/inference.GRPCInferenceService/ModelStreamInfer",)
WORKERS = 64  # calls in flight at once (each holds a thread while Triton computes)
# Reconnect to a restarted Triton within a second, not after gRPC's default backoff of up to 2 min.
UPSTREAM_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
                    ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _metadata(context) -> list[tuple[str, str]]:
    """The caller's own metadata (transport headers such as user-agent stay with the transport)."""
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-")) and k != "user-agent"]


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


class GrpcGuard:
    """Listens on (host, port) (port 0: a free one, then in `.port`), forwards to `upstream` "host:port"."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = MAX_BODY_BYTES, workers: int = WORKERS):
        self.upstream = upstream
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.workers = workers
        self._server = None
        self._channel = None
        self._target = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"{host}:{self.port}"

    def start(self) -> GrpcGuard:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="boot-grpc-guard"),
            handlers=[_Forward(self)], maximum_concurrent_rpcs=self.workers * 4,
            options=[("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._server.add_insecure_port(f"{host}:{self.port}")
        if port == 0:
            raise OSError(f"the gRPC guard cannot listen on {self.host}:{self.port}")
        self.port = port
        self._server.start()
        return self

    def channel(self):
        """The channel to Triton (rebuilt when `upstream` changes)."""
        with self._lock:
            return self._channel_locked()

    def _channel_locked(self):
        if self._target != self.upstream:
            old, self._channel = self._channel, grpc.insecure_channel(self.upstream, options=UPSTREAM_OPTIONS)
            self._target = self.upstream
            if old is not None:
                old.close()
        return self._channel

    def stop(self) -> None:
        """Stop serving and close the channel to Triton (idempotent)."""
        server, channel = self._server, self._channel
        self._server = self._channel = self._target = None
        if server is not None:
            server.stop(grace=5).wait()
        if channel is not None:
            channel.close()

    def __enter__(self) -> GrpcGuard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _relay_error(err: grpc.RpcError, context) -> None:
    """Triton's status and message as this call's (context.abort raises)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNAVAILABLE
    context.abort(code, err.details() if hasattr(err, "details") else str(err))


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, guard: GrpcGuard):
        self.guard = guard

    def service(self, details):
        method = details.method
        if method in STREAM_METHODS:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(method, request, context))

    def _unary(self, method: str, request: bytes, context):
        try:
            return self.guard.channel().unary_unary(method)(request, metadata=_metadata(context),
                                                            timeout=_timeout(context))
        except grpc.RpcError as err:
            _relay_error(err, context)

    def _stream(self, method: str, requests, context):
        try:
            yield from self.guard.channel().stream_stream(method)(requests, metadata=_metadata(context),
                                                                  timeout=_timeout(context))
        except grpc.RpcError as err:
            _relay_error(err, context)
