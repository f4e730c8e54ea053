"""The HTTP guard's side toward Triton and its own answers: the connection to Triton of each client
connection, the byte-for-byte relay of Triton's responses, and the guard's JSON error responses.
"""

from __future__ import annotations

import asyncio
import json

from boot_serve.guard_limits import MAX_HEAD_BYTES

CHUNK = 1 << 18
STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
               408: "Request Timeout", 413: "Content Too Large", 415: "Unsupported Media Type",
               417: "Expectation Failed", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
               503: "Service Unavailable", 504: "Gateway Timeout"}


async def within(awaitable, seconds: float):
    """`awaitable`'s result, or asyncio.TimeoutError after `seconds` (asyncio.timeout where Python has
    it: no task per call, which asyncio.wait_for costs on every read and write of every request)."""
    if hasattr(asyncio, "timeout"):  # Python >= 3.11
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def response(status: int, message: str, close: bool = True) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
            ).encode() + body


class Upstream:
    """One client connection's connection to Triton, opened on first use, after Triton closed it,
    and when Triton moved (a restart on new ports)."""

    def __init__(self):
        self.address: tuple[str, int] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, address: tuple[str, int], data: bytes) -> bool:
        """Write a request; True when it went over a connection that had served before (may be stale)."""
        reused = self.writer is not None and not self.writer.is_closing() and self.address == address
        if not reused:
            self.close()
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(*address, limit=MAX_HEAD_BYTES * 4), 5.0)
            self.address = address
        self.writer.write(data)
        await self.writer.drain()
        return reused

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = self.address = None


async def relay_response(up: asyncio.StreamReader, client: asyncio.StreamWriter, method: str,
                         relayed: list[bool], drain) -> bool:
    """Copy one response from Triton (trusted: it only ever answers the guard's own requests) to
    the client byte for byte (relayed[0] = True once its head is written); False when the
    connection must close."""
    head = await up.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        client.write(head)
        relayed[0] = True
        await drain()
        return keep_alive
    if b"content-length" in headers and int(headers[b"content-length"]) <= CHUNK:
        # The usual answer (an image or an error): head and body in one write, one send.
        client.write(head + await up.readexactly(int(headers[b"content-length"])))
        relayed[0] = True
        await drain()
        return keep_alive
    client.write(head)
    relayed[0] = True
    if b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left:
            piece = await up.read(min(left, CHUNK))
            if not piece:
                raise ConnectionError("tritonserver closed the connection mid-response")
            client.write(piece)
            left -= len(piece)
            await drain()
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
            await drain()
    else:  # delimited by closing the connection
        while piece := await up.read(CHUNK):
            client.write(piece)
            await drain()
        keep_alive = False
    await drain()
    return keep_alive
