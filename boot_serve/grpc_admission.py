"""Bounds on what the gRPC guard's callers hold: calls in flight per client address and in all, open
streams, a deadline on every unary call, an idle timeout and a lifetime for streams, requests a stream
may have awaiting their answer, and HTTP/2 limits on connections. The constants are the defaults,
each a keyword of boot_serve.grpc_guard.GrpcGuard.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

from boot_serve.grpc_policy import Refused

# Threads serving calls; a call holds one while Triton computes (a stream for its whole life).
WORKERS = 64
# Calls in flight at once, in all: below WORKERS, so threads stay free to refuse calls past the
# caps at once instead of queueing them behind running ones.
MAX_CALLS = 48
# Calls in flight from one client address: a client (boot_serve.client runs 8 at once) cannot take
# every thread; clients behind one NAT or proxy share it, so it is not much lower than MAX_CALLS.
MAX_CALLS_PER_CLIENT = 32
# Open ModelStreamInfer streams, in all and per client address: each holds a thread here (and one
# in gRPC's channel) for as long as it is open, however little it sends.
MAX_STREAMS = 16
MAX_STREAMS_PER_CLIENT = 4
# A unary call without a deadline gets this one, so a hung upstream call frees its thread; longer
# deadlines a client asks for are cut to MAX_CALL_DEADLINE_S.
CALL_DEADLINE_S = 60.0
MAX_CALL_DEADLINE_S = 300.0
# A stream with no message either way for this long is closed (DEADLINE_EXCEEDED): a client that
# opens streams and sends nothing does not keep their threads.
STREAM_IDLE_S = 30.0
# A stream is closed after this long, however busy: a client reconnects, and caps apply afresh.
STREAM_LIFETIME_S = 600.0
# Requests a stream may have sent to Triton without an answer yet; the guard reads the client's
# next message only when one comes back. Without it a single stream (one call against the caps)
# could queue any amount of work in Triton. Each request of the served (non-decoupled) models is
# answered by one stream response.
STREAM_PENDING = 8
# HTTP/2 streams at once on one connection (gRPC's default is unbounded): no more than a client
# may hold anyway; beyond, the client's own gRPC waits.
MAX_STREAMS_PER_CONNECTION = MAX_CALLS_PER_CLIENT
# Connections without a call for this long are closed (clients' gRPC reconnects when needed).
CONNECTION_IDLE_S = 120.0


@dataclass
class Counts:
    calls: int = 0
    streams: int = 0


class Admission:
    """Calls and streams in flight, per client address and in all, against the caps of `guard` (the
    GrpcGuard's max_calls, max_calls_per_client, max_streams, max_streams_per_client)."""

    def __init__(self, guard):
        self.guard = guard
        self.lock = threading.Lock()
        self.total = Counts()
        self.clients: dict[str, Counts] = {}

    def take(self, client: str, stream: bool) -> None:
        g = self.guard
        with self.lock:
            mine = self.clients.get(client, Counts())
            if mine.calls >= g.max_calls_per_client:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{client} has {mine.calls} calls in flight, the most one client may; "
                               "retry when one finishes")
            if self.total.calls >= g.max_calls:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server has {self.total.calls} calls in flight, its limit; retry shortly")
            if stream and mine.streams >= g.max_streams_per_client:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{client} has {mine.streams} streams open, the most one client may; close one first")
            if stream and self.total.streams >= g.max_streams:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server has {self.total.streams} streams open, its limit; retry later")
            for counts in (mine, self.total):
                counts.calls += 1
                counts.streams += stream
            self.clients[client] = mine

    def give(self, client: str, stream: bool) -> None:
        with self.lock:
            mine = self.clients[client]
            for counts in (mine, self.total):
                counts.calls -= 1
                counts.streams -= stream
            if mine.calls == 0:
                del self.clients[client]


class Stream:
    """One open ModelStreamInfer: its activity for the watchdog, its answers awaited, and why it was
    closed (the first reason wins; closing cancels the upstream call)."""

    def __init__(self, pending: int):
        self.started = self.active = time.monotonic()
        self.pending_limit = pending
        self.pending = 0
        self.cond = threading.Condition()
        self.reason: tuple[grpc.StatusCode, str] | None = None
        self.call = None

    def touch(self) -> None:
        self.active = time.monotonic()

    def attach(self, call) -> None:
        with self.cond:
            self.call = call
            closed = self.reason is not None
        if closed:
            call.cancel()

    def close(self, code: grpc.StatusCode, message: str) -> None:
        with self.cond:
            if self.reason is not None:
                return
            self.reason = (code, message)
            call = self.call
            self.cond.notify_all()
        if call is not None:
            call.cancel()

    def wait_for_room(self) -> bool:
        """Block while STREAM_PENDING requests await their answer; False once the stream is closed."""
        with self.cond:
            while self.reason is None and self.pending_limit and self.pending >= self.pending_limit:
                self.cond.wait()
            if self.reason is not None:
                return False
            self.pending += 1
            return True

    def answered(self) -> None:
        with self.cond:
            self.pending = max(0, self.pending - 1)
            self.cond.notify_all()
