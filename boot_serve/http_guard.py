"""An HTTP guard in front of Triton's HTTP endpoint: it reads every request with h11 (a strict,
fuzzed HTTP/1.1 parser), decides by the rules of boot_serve.guard_rules, and sends Triton a
request of its own making; Triton never parses a byte a client wrote.

    with Guard("127.0.0.1", triton_http_port, "0.0.0.0", 8000, models=("boot_txt2img",)) as guard: ...

`python -m boot_serve.serve` starts one in front of its tritonserver by default (docs/robustness.md);
`python -m boot_serve.guard` starts one on its own. Its limits: boot_serve.guard_limits; its side
toward Triton: boot_serve.guard_relay.

Why it exists: the tritonserver 2.51 of the nvidia-pytriton wheel dies on some requests no client
needs to send (a JSON body nesting ~35,000 arrays, an Accept-Encoding q-value out of double range,
out-of-range numbers in trace and logging settings), buffers bodies up to 64 MB, and answers its
control APIs (shared memory, repository, trace, logging) to anyone.

Answered here, each with `{"error": "..."}` (the body Triton gives its own errors) and a log line:
- 400: anything h11 refuses (request line, header syntax, chunk framing, ...); a header the guard
  or Triton interprets that does not match its strict grammar, or that appears twice;
  Content-Length with Transfer-Encoding; a body that is not what its Content-Encoding says (or has
  trailing data, a bad checksum, is truncated); an inference JSON part that is not an object,
  does not balance, nests deeper than `max_json_depth`, or is not a request boot_serve.infer_schema
  reads (a shape promising more elements than the request holds, a key twice, an unknown field);
- 403: a closed API (shared memory, repository, trace, logging), a tensor in shared memory, or
  statistics without the operator key; 404: a path outside the allow-list or a model not served;
  405: a wrong method;
- 408: a request head not complete within `head_timeout` s, or a request within `read_timeout` s;
- 413: a body (or what it inflates to) over `max_body_bytes`, decided as early as possible;
- 415: a Content-Encoding other than gzip, deflate, identity; 417: an Expect other than 100-continue;
- 429: a connection beyond `max_connections_per_client` from one address, or beyond
  `max_connections` in all when none is idle (an idle keep-alive connection is closed to make room);
- 503: Triton is down (restarting after a crash, or the supervisor gave up: the message says which),
  or the worker checking a large body died (boot_serve.guard_workers).
Triton's own answers (its errors included) are relayed byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from dataclasses import dataclass

import h11

from boot_serve.guard_limits import MAX_HEAD_BYTES, ClientConnection, Connections, Limits
from boot_serve.guard_relay import CHUNK, Upstream, relay_response, response, within
from boot_serve.guard_rules import (
    Refused,
    canonical_path,
    check_headers,
    route,
    upstream_request,
)
from boot_serve.guard_workers import BodyCheckers

LINGER = 2.0


@dataclass
class Request:
    """One accepted client request: what goes to Triton, and whether the client keeps the connection."""

    method: str
    data: bytes
    keep_alive: bool


class Guard:
    """The guard on (host, port), forwarding to Triton's HTTP endpoint at (upstream_host, upstream_port).
    `models`: the model names clients may reach (None: any); `operator_key`: the key that opens
    statistics. `start()` returns once it listens (port 0: a free one, then in `.port`); it runs
    on a thread of its own. `set_upstream(None, reason)` answers 503 with `reason` until Triton is
    back (`set_upstream((host, port))`)."""

    def __init__(self, upstream_host: str | None, upstream_port: int | None, host: str = "127.0.0.1",
                 port: int = 0, limits: Limits = Limits(), log=None, models: tuple[str, ...] | None = None,
                 operator_key: str | None = None):
        self.upstream = (upstream_host, upstream_port) if upstream_host is not None else None
        self.down_reason = "tritonserver is not answering; it may be restarting, try again shortly"
        self.host, self.port = host, port
        self.limits = limits
        self.models = tuple(models) if models is not None else None
        self.operator_key = operator_key
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.refused = 0  # requests answered 4xx here
        self.heartbeat = time.monotonic()  # refreshed by the event loop while it runs freely
        self._connections = Connections(limits)
        self._checkers = BodyCheckers()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"{host}:{self.port}"

    def set_upstream(self, address: tuple[str, int] | None, reason: str | None = None) -> None:
        """Where Triton is now; None while it is down, answering 503 with `reason`."""
        if reason:
            self.down_reason = reason
        self.upstream = address

    def responsive(self, within: float = 5.0) -> bool:
        """Whether the event loop ran its heartbeat within the last `within` seconds."""
        return self._loop is not None and time.monotonic() - self.heartbeat < within

    def start(self) -> Guard:
        self._thread = threading.Thread(target=self._run, name="boot-http-guard", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop listening and end the thread (idempotent)."""
        loop, server, thread = self._loop, self._server, self._thread
        self._loop = self._server = self._thread = None
        if loop is not None and server is not None and not loop.is_closed():
            loop.call_soon_threadsafe(server.close)
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_HEAD_BYTES)
        except OSError as err:
            self._error = OSError(f"the HTTP guard cannot listen on {self.host}:{self.port}: {err}")
            self._started.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        await self._checkers.start()
        self._loop = loop
        beat = loop.create_task(self._beat())
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()
        beat.cancel()
        await self._checkers.close()

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(0.5)

    # connections -------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if peer else "?"
        why = self._connections.admit(ip)
        if why is not None:
            self.log(f"boot guard: refused a connection from {ip}: {why}")
            writer.write(response(429, why))
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.transport.abort()
            return
        client = self._connections.add(writer, ip)
        upstream, buffered = Upstream(), b""
        try:
            while True:
                client.idle, client.since = True, time.monotonic()
                try:
                    got = await self._read_request(reader, writer, buffered, client)
                except Refused as refused:
                    await self._refuse(reader, writer, ip, refused)
                    return
                if got is None:
                    return
                request, buffered = got
                if not await self._forward(request, writer, upstream) or not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass  # the client went away, or stopped reading
        except asyncio.CancelledError:
            pass  # the guard is stopping
        finally:
            self._connections.forget(client)
            upstream.close()
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, deadline: float | None, refusal: Refused | None) -> bytes:
        """The next bytes from the client; b"" at its end. Past `deadline`: Refused `refusal`
        (None: asyncio.TimeoutError, a silent close)."""
        timeout = self.limits.idle_timeout if deadline is None else deadline - time.monotonic()
        try:
            return await within(reader.read(CHUNK), max(timeout, 0.0))
        except asyncio.TimeoutError:
            if refusal is None:
                raise
            raise refusal from None

    async def _read_request(self, reader, writer, buffered: bytes, client: ClientConnection):
        """(Request, bytes already read past it), None when the client closed; Refused for anything
        the guard answers itself; asyncio.TimeoutError when the connection idled out."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        if buffered:  # (b"" would tell h11 the client closed)
            conn.receive_data(buffered)
        received = len(buffered)
        limits = self.limits
        started = time.monotonic() if buffered else None  # the first byte of this request
        accepted, headers, body, size = None, None, [], 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as err:
                if accepted is None and received - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                    raise Refused(431, f"the request head is over {MAX_HEAD_BYTES} bytes") from None
                hint = err.error_status_hint
                raise Refused(hint if 400 <= hint < 500 else 400, f"malformed HTTP request: {err}") from None
            if event is h11.NEED_DATA:
                if started is None:  # between requests: wait up to idle_timeout, then close quietly
                    data = await self._read(reader, None, None)
                    started = time.monotonic()
                else:
                    limit = limits.head_timeout if accepted is None else limits.read_timeout
                    what = "request head" if accepted is None else "request"
                    data = await self._read(reader, started + limit,
                                            Refused(408, f"the {what} did not arrive within {limit:g} s"))
                client.idle = False
                received += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                # h11 caps a head that arrives in pieces; one that arrives whole is measured here.
                if received - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                    raise Refused(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
                accepted, headers = self._check_head(event)
                framing = "chunked " if any(n == b"transfer-encoding" for n, _ in event.headers) else ""
                if headers.expect_continue and conn.they_are_waiting_for_100_continue:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await self._drain(writer)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise Refused(413, f"the {framing}request body passes {limits.max_body_bytes} bytes; this server "
                                       f"accepts at most {limits.max_body_bytes}")
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                data = await self._check_body(accepted, headers, b"".join(body))
                request, r = accepted
                tokens = {t.strip().lower() for name, value in request.headers if name == b"connection"
                          for t in value.split(b",")}
                keep = b"close" not in tokens and (request.http_version == b"1.1" or b"keep-alive" in tokens)
                leftover, closed = conn.trailing_data
                return Request(r.method, data, keep and not closed), leftover
            else:  # h11.ConnectionClosed: the client closed between requests
                return None

    def _check_head(self, event: h11.Request):
        """(route, headers) of a request head, or Refused."""
        headers = check_headers(list(event.headers), self.operator_key)
        r = route(event.method.decode("ascii", "replace"), canonical_path(event.target), self.models,
                  headers.operator)
        length = next((int(v) for n, v in event.headers if n == b"content-length"), None)
        if length is not None and length > self.limits.max_body_bytes:
            raise Refused(413, f"the request body is {length} bytes; this server accepts at most "
                               f"{self.limits.max_body_bytes}")
        return (event, r), headers

    async def _check_body(self, accepted, headers, body: bytes) -> bytes:
        """The request Triton gets (boot_serve.guard_rules.upstream_request), or Refused."""
        _, r = accepted
        if not r.infer:
            if body:
                raise Refused(400, f"{r.method} {r.path} takes no body")
            return upstream_request(r, headers, b"", self._host(), self.operator_key)
        if not body:
            raise Refused(400, "an inference request needs a JSON body")

        decoded = await self._checkers.check(body, headers.content_encoding, headers.header_length,
                                             self.limits.max_body_bytes, self.limits.max_json_depth)
        return upstream_request(r, headers, decoded, self._host(), self.operator_key)

    def _host(self) -> str:
        return "{}:{}".format(*self.upstream) if self.upstream else "tritonserver"

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        await within(writer.drain(), self.limits.write_timeout)

    async def _forward(self, request: Request, writer, upstream: Upstream) -> bool:
        """Send one accepted request to Triton and relay its answer; False when the connection ends."""
        address = self.upstream
        if address is None:
            writer.write(response(503, self.down_reason))
            await self._drain(writer)
            return False
        relayed = [False]  # set once the response head went to the client: no retry, no 503 after that

        async def exchange(fresh: bool) -> bool:
            if fresh:
                upstream.close()
            reused = await upstream.send(address, request.data)
            try:
                return await within(relay_response(upstream.reader, writer, request.method, relayed,
                                                             lambda: self._drain(writer)),
                                              self.limits.upstream_timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused or relayed[0]:
                    raise
                return await exchange(True)  # Triton restarted since this connection last served

        try:
            return await exchange(False)
        except asyncio.TimeoutError:
            upstream.close()
            if relayed[0]:
                return False
            writer.write(response(504, f"tritonserver did not answer within {self.limits.upstream_timeout:g} s"))
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
            upstream.close()
            if relayed[0]:
                return False
            writer.write(response(503, f"tritonserver is not answering ({type(err).__name__}); it may be "
                                       "restarting, try again shortly"))
        await self._drain(writer)
        return False

    async def _refuse(self, reader, writer, ip: str, refused: Refused) -> None:
        """Answer `refused` and end the connection. What the client still sends is read and dropped
        for up to LINGER seconds first: closing with unread bytes would reset the connection, and the
        client would see the reset instead of the answer."""
        self.refused += 1
        self.log(f"boot guard: refused a request from {ip}: {refused.status} {refused}")
        writer.write(response(refused.status, str(refused)))
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await self._drain(writer)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard(reader), LINGER)


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK):
        pass
