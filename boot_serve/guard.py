"""An HTTP guard in front of Triton's HTTP endpoint: a request that could crash or exhaust the server
is refused before Triton parses it; every other request passes through unchanged.

    python -m boot_serve.guard --listen 0.0.0.0:8000 --upstream 127.0.0.1:18000

`python -m boot_serve.serve` starts one in front of its tritonserver by default (docs/robustness.md).

Why it exists: the tritonserver 2.51 of the nvidia-pytriton wheel dies with a segmentation fault on
an inference request whose JSON nests about 35,000 arrays deep (a body of ~70 KB, no authentication
needed), and it buffers any body up to its built-in 64 MB limit (2.51 has no flag to lower it).

Refused here, each with a 4xx and `{"error": "..."}` (the body Triton gives its own errors, so
tritonclient shows the message), and logged in one line:
- 400: a request line or header that is not HTTP/1.x; Content-Length together with
  Transfer-Encoding, or a Transfer-Encoding other than chunked (the request-smuggling shapes); a
  JSON part (the whole body, or the first Inference-Header-Content-Length bytes of a binary-tensor
  request) nesting arrays/objects deeper than `max_json_depth`;
- 408: a request head or body that has not arrived within `read_timeout` seconds;
- 413: a body over `max_body_bytes`, decided from Content-Length before any byte of it is read, or
  while a chunked body arrives, or while a gzip/deflate body (Content-Encoding) is inflated;
- 431: a request head over MAX_HEAD_BYTES;
- 503: a new connection while MAX_CONNECTIONS are open (idle keep-alive connections close after
  IDLE_TIMEOUT seconds without a request).
A refused request closes its connection (its body may be unread). When Triton does not answer
(restarting after a crash), requests get 503 `{"error": "..."}`, which boot_serve.client reports as
ServerUnavailableError.

Passed through: request line, headers and body bytes as received (a chunked body is forwarded
de-chunked with a Content-Length; an `Expect: 100-continue` is answered here and not forwarded),
over one upstream connection per client connection, so keep-alive and pipelining behave as they do
with Triton (responses in request order). Responses are relayed byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import threading
import zlib
from dataclasses import dataclass

# A valid boot_txt2img request nests 5 levels (body {, inputs [, input {, data [, row [); twice
# that and more leaves room for any client's layout and stays three orders of magnitude below the
# depth that crashes Triton 2.51.
MAX_JSON_DEPTH = 16
# 8 prompts (max_batch_size) of MAX_PROMPT_BYTES (4096) each, JSON-escaped at up to 3 bytes per
# byte (\uXXXX pairs for 4-byte characters), is ~100 KB; a megabyte is ten times that.
MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 16 << 10
READ_TIMEOUT = 30.0
IDLE_TIMEOUT = 75.0  # an open connection with no request in it
MAX_CONNECTIONS = 512  # open client connections; beyond, a new one gets 503 and is closed
LINGER = 2.0
CHUNK = 1 << 18
STATUS_TEXT = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
               431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable"}


class Refused(Exception):
    """A request the guard answers itself: HTTP `status` with `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    read_timeout: float = READ_TIMEOUT

    def __post_init__(self):
        if self.max_body_bytes < 1 or self.max_json_depth < 1 or self.read_timeout <= 0:
            raise ValueError(f"guard limits must be positive, got {self}")


# --------------------------------------------------------------------------------------------
# What a request carries
# --------------------------------------------------------------------------------------------
# A JSON string (escapes included) or one bracket; everything else between them is skipped.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def nests_deeper(data: bytes, limit: int) -> bool:
    """Whether JSON text `data` nests arrays/objects more than `limit` levels deep (brackets inside
    strings do not count). Linear, no recursion, stops at the first level past the limit."""
    if data.count(b"[") + data.count(b"{") <= limit:  # cannot nest deeper than it has brackets
        return False
    depth = 0
    for token in _JSON_TOKENS.finditer(data):
        c = token.group()[0]
        if c in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif c in b"]}":
            depth -= 1
    return False


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body decompressed, Refused(413) as soon as it would exceed `limit` bytes."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        return b""  # not what it says it is: Triton answers that one itself
    if len(out) > limit or inflater.unconsumed_tail:
        raise Refused(413, f"the request body inflates ({encoding}) to over {limit} bytes; this server "
                           f"accepts at most {limit}")
    return out


def check_body(body: bytes, headers: dict[str, str], limits: Limits) -> None:
    """Refused unless the body's JSON part nests at most limits.max_json_depth levels."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = inflate(body, encoding, limits.max_body_bytes)
    json_part = body
    header_length = headers.get("inference-header-content-length")
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            return  # Triton refuses a bad binary header length before it parses anything
        json_part = body[:int(header_length)]
    if nests_deeper(json_part, limits.max_json_depth):
        raise Refused(400, f"the request JSON nests more than {limits.max_json_depth} levels deep; no valid "
                           "request to this server needs that")


# --------------------------------------------------------------------------------------------
# HTTP/1.1 framing
# --------------------------------------------------------------------------------------------
def check_request_line(line: bytes) -> list[bytes]:
    """[method, target, version] of an HTTP/1.x request line, else Refused(400)."""
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise Refused(400, f"not an HTTP/1.x request line: {line[:80]!r}")
    return parts


def parse_head(head: bytes) -> tuple[str, str, dict[str, str], list[bytes]]:
    """(method, version, headers by lower-case name, raw header lines) of a request head."""
    lines = head[:-4].split(b"\r\n")
    parts = check_request_line(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise Refused(400, f"malformed header line: {line[:80]!r}")
        key = name.decode("latin-1").lower()
        value_text = value.strip().decode("latin-1")
        if key in headers and key in ("content-length", "transfer-encoding", "content-encoding",
                                      "inference-header-content-length"):
            if headers[key] != value_text:
                raise Refused(400, f"conflicting {key} headers")
        headers[key] = value_text
    return parts[0].decode("latin-1"), parts[2].decode("latin-1"), headers, lines[1:]


async def read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A chunked body, de-chunked; Refused(413) once it passes `limit` bytes."""
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise Refused(400, f"malformed chunk size {size_line[:40]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, dropped
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise Refused(413, f"the chunked request body passes {limit} bytes; this server accepts at most {limit}")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise Refused(400, "malformed chunked body")


def response(status: int, message: str, close: bool = True) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
            ).encode() + body


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------
async def _drain_input(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK):
        pass


class Upstream:
    """One client connection's connection to Triton, opened on first use and after Triton closed it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, data: bytes) -> bool:
        """Write a request; True when it went over a connection that had served before (may be stale)."""
        reused = self.writer is not None and not self.writer.is_closing()
        if not reused:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES * 4)
        self.writer.write(data)
        await self.writer.drain()
        return reused

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def relay_response(up: asyncio.StreamReader, client: asyncio.StreamWriter, method: str,
                         relayed: list[bool]) -> bool:
    """Copy one response from Triton to the client, byte for byte (relayed[0] = True once its head is
    written); False when the connection must close."""
    head = await up.readuntil(b"\r\n\r\n")
    client.write(head)
    relayed[0] = True
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return keep_alive
    if b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left:
            piece = await up.read(min(left, CHUNK))
            if not piece:
                raise ConnectionError("tritonserver closed the connection mid-response")
            client.write(piece)
            left -= len(piece)
            await client.drain()
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size_line = await up.readuntil(b"\r\n")
            client.write(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (line := await up.readuntil(b"\r\n")) != b"\r\n":
                    client.write(line)
                client.write(line)
                break
            client.write(await up.readexactly(size + 2))
            await client.drain()
    else:  # delimited by closing the connection
        while piece := await up.read(CHUNK):
            client.write(piece)
        keep_alive = False
    await client.drain()
    return keep_alive


class Guard:
    """The guard on (host, port), forwarding to Triton's HTTP endpoint at (upstream_host, upstream_port).
    `start()` returns once it listens (port 0: a free one, then in `.port`); it runs on a thread of its own."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits = Limits(), log=None):
        self.upstream = (upstream_host, upstream_port)
        self.host, self.port = host, port
        self.limits = limits
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.refused = 0  # requests answered 4xx here
        self.connections = 0  # open client connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"{host}:{self.port}"

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
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_HEAD_BYTES)
        except OSError as err:
            self._error = OSError(f"the HTTP guard cannot listen on {self.host}:{self.port}: {err}")
            self._started.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.connections >= MAX_CONNECTIONS:  # idle or slow connections must not exhaust file descriptors
            self.log(f"boot guard: {MAX_CONNECTIONS} connections open; refused one from {peer[0] if peer else '?'}")
            writer.write(response(503, f"this server has {MAX_CONNECTIONS} connections open; try again shortly"))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()
            return
        self.connections += 1
        upstream = Upstream(*self.upstream)
        try:
            while await self._one_request(reader, writer, upstream, peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client went away
        finally:
            self.connections -= 1
            upstream.close()
            writer.close()

    async def _one_request(self, reader, writer, upstream: Upstream, peer) -> bool:
        """Read, check and forward one request, relay its response; False when the connection ends."""
        try:  # an idle keep-alive connection waits up to IDLE_TIMEOUT, then closes without a word
            first = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            return False
        except asyncio.LimitOverrunError:
            return await self._refuse(reader, writer, peer, Refused(431, f"the request line is over {MAX_HEAD_BYTES} "
                                                                         "bytes"))
        try:
            head, method, version, headers, body = await asyncio.wait_for(
                self._read_request(first, reader, writer), self.limits.read_timeout)
        except asyncio.IncompleteReadError:
            self.log(f"boot guard: {peer}: connection closed mid-request")
            return False
        except asyncio.TimeoutError:
            return await self._refuse(reader, writer, peer, Refused(
                408, f"the request did not arrive within {self.limits.read_timeout:g} s"))
        except asyncio.LimitOverrunError:
            return await self._refuse(reader, writer, peer, Refused(431, f"the request head is over {MAX_HEAD_BYTES} "
                                                                         "bytes"))
        except Refused as refused:
            return await self._refuse(reader, writer, peer, refused)
        relayed = [False]  # set once the response head went to the client: no retry, no 503 after that
        try:
            reused = await upstream.send(head + body)
            try:
                keep_alive = await relay_response(upstream.reader, writer, method, relayed)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused or relayed[0]:
                    raise
                upstream.close()  # Triton restarted since this connection last served: once more, fresh
                await upstream.send(head + body)
                keep_alive = await relay_response(upstream.reader, writer, method, relayed)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
            upstream.close()
            if not relayed[0]:
                writer.write(response(503, f"tritonserver is not answering ({type(err).__name__}); it may be "
                                           "restarting, try again shortly"))
                await writer.drain()
            return False
        close = headers.get("connection", "").lower() == "close" or (
            version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive")
        return keep_alive and not close

    async def _read_request(self, first: bytes, reader, writer):
        check_request_line(first)
        head = first
        while not head.endswith(b"\r\n\r\n"):  # header lines up to the empty one
            head += await reader.readuntil(b"\r\n")
            if len(head) > MAX_HEAD_BYTES:
                raise Refused(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
        method, version, headers, lines = parse_head(head)
        length, chunked = headers.get("content-length"), "transfer-encoding" in headers
        if chunked and (length is not None or headers["transfer-encoding"].lower() != "chunked"):
            raise Refused(400, "Transfer-Encoding must be chunked alone, without Content-Length")
        if length is not None and not length.isdigit():
            raise Refused(400, f"Content-Length {length[:20]!r} is not a byte count")
        if length is not None and int(length) > self.limits.max_body_bytes:
            raise Refused(413, f"the request body is {int(length)} bytes; this server accepts at most "
                               f"{self.limits.max_body_bytes}")
        if "expect" in headers or chunked:  # answered here / re-framed: forward the rest of the head
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            drop = (b"expect:", b"transfer-encoding:")
            kept = [line for line in lines if not line.lower().startswith(drop)]
            body = await read_chunked(reader, self.limits.max_body_bytes) if chunked else \
                await reader.readexactly(int(length or 0))
            if chunked:
                kept.append(f"Content-Length: {len(body)}".encode())
            head = b"\r\n".join([head.split(b"\r\n", 1)[0], *kept]) + b"\r\n\r\n"
        else:
            body = await reader.readexactly(int(length or 0))
        if body:
            check_body(body, headers, self.limits)
        return head, method, version, headers, body

    async def _refuse(self, reader, writer, peer, refused: Refused) -> bool:
        """Answer `refused` and end the connection. What the client still sends is read and dropped
        for up to LINGER seconds first: closing with unread bytes would reset the connection, and the
        client would see the reset instead of the answer."""
        self.refused += 1
        self.log(f"boot guard: refused a request from {peer[0] if peer else '?'}: {refused.status} {refused}")
        writer.write(response(refused.status, str(refused)))
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_drain_input(reader), LINGER)
        return False


# --------------------------------------------------------------------------------------------
# CLI (a guard on its own, e.g. in front of a tritonserver started otherwise)
# --------------------------------------------------------------------------------------------
def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m boot_serve.guard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 8000), help="HOST:PORT the HTTP guard binds")
    p.add_argument("--upstream", type=_address, required=True, help="HOST:PORT of Triton's HTTP endpoint")
    p.add_argument("--grpc-listen", type=_address, default=None,
                   help="HOST:PORT the gRPC guard binds (boot_serve.grpc_guard; with --grpc-upstream)")
    p.add_argument("--grpc-upstream", type=_address, default=None, help="HOST:PORT of Triton's gRPC endpoint")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="largest HTTP body / gRPC message accepted")
    p.add_argument("--max-json-depth", type=int, default=MAX_JSON_DEPTH, help="deepest JSON nesting accepted")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                   help="seconds a request's head and body may take to arrive")
    args = p.parse_args(argv)
    if (args.grpc_listen is None) != (args.grpc_upstream is None):
        p.error("--grpc-listen and --grpc-upstream go together")
    try:
        limits = Limits(args.max_body_bytes, args.max_json_depth, args.read_timeout)
    except ValueError as err:
        p.error(str(err))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    guards = []
    try:
        guards.append(Guard(*args.upstream, *args.listen, limits=limits).start())
        print(f"boot guard: HTTP {guards[0].url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
        if args.grpc_listen is not None:
            from boot_serve.grpc_guard import GrpcGuard

            upstream = "{}:{}".format(*args.grpc_upstream)
            guards.append(GrpcGuard(upstream, *args.grpc_listen, max_message_bytes=limits.max_body_bytes).start())
            print(f"boot guard: gRPC {guards[1].url} -> {upstream}", flush=True)
    except OSError as err:
        for guard in guards:
            guard.stop()
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop.wait()
    for guard in guards:
        guard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
