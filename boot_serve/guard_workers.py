"""Where the HTTP guard checks large request bodies: worker processes, so that reading a hostile
megabyte never holds the interpreter lock of the event loop that serves every other client.

Python's json parser holds the GIL for its whole run (about 0.3 s for the worst megabyte the guard
accepts to read), so a thread does not help; a process does. Bodies under SMALL_BODY (every request a
client of this server normally sends) are checked on the event loop itself, where a check costs tens
of microseconds and a worst case about a millisecond per 4 KiB.

The workers are `python -m boot_serve.guard_workers` processes of their own (not multiprocessing,
which would re-import the embedding program's main module in each worker), reading length-prefixed
bodies on stdin and answering on stdout; they exit when the guard closes their stdin or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
from pathlib import Path

from boot_serve.guard_rules import Refused
from boot_serve.infer_schema import checked_infer_body

SMALL_BODY = 16 << 10  # identity bodies under this are checked inline
CHECK_TIMEOUT = 30.0  # a worker that takes longer is killed (the worst megabyte takes ~0.3 s)
CODINGS = ("identity", "gzip", "deflate")
_ASK = struct.Struct("<Bqqqq")  # coding, Inference-Header-Content-Length (-1: none), max body, max depth, length
_ANSWER = struct.Struct("<Hq")  # status (0: accepted, the decoded body follows; else the refusal's message)


class BodyCheckers:
    """`workers` worker processes running boot_serve.infer_schema.checked_infer_body, started by
    `start()` inside the guard's event loop."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or min(2, os.cpu_count() or 1)
        self._idle: asyncio.Queue | None = None

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        for _ in range(self.workers):
            self._idle.put_nowait(await _spawn())

    async def check(self, body: bytes, coding: str, header_length: int | None, max_body: int,
                    max_depth: int) -> bytes:
        """The decoded, checked body (Refused as checked_infer_body raises it); Refused(503) when a
        worker failed on it (it is replaced: the next request finds a working one)."""
        if (coding == "identity" and len(body) < SMALL_BODY) or self._idle is None:
            return checked_infer_body(body, coding, header_length, max_body, max_depth)
        worker = await self._idle.get()
        try:
            ask = _ASK.pack(CODINGS.index(coding), -1 if header_length is None else header_length, max_body,
                            max_depth, len(body))
            status, payload = await asyncio.wait_for(_exchange(worker, ask + body), CHECK_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            _kill(worker)
            worker = await _spawn()
            raise Refused(503, "the guard could not check this request (its checker stopped); try again") from None
        finally:
            self._idle.put_nowait(worker)
        if status:
            raise Refused(status, payload.decode())
        return payload

    async def close(self) -> None:
        idle, self._idle = self._idle, None
        while idle is not None and not idle.empty():
            worker = idle.get_nowait()
            worker.stdin.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker.wait(), 5)
            _kill(worker)


async def _spawn() -> asyncio.subprocess.Process:
    root = str(Path(__file__).resolve().parent.parent)  # boot_serve's parent, importable in the worker
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "boot_serve.guard_workers", env=env,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)


async def _exchange(worker: asyncio.subprocess.Process, data: bytes) -> tuple[int, bytes]:
    worker.stdin.write(data)
    await worker.stdin.drain()
    status, length = _ANSWER.unpack(await worker.stdout.readexactly(_ANSWER.size))
    return status, await worker.stdout.readexactly(length)


def _kill(worker: asyncio.subprocess.Process) -> None:
    if worker.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.kill()


def serve(source=None, sink=None) -> None:
    """The worker: one answer per body read from `source` (stdin), written to `sink` (stdout), until
    its input ends."""
    source, sink = source or sys.stdin.buffer, sink or sys.stdout.buffer
    while len(ask := source.read(_ASK.size)) == _ASK.size:
        coding, header_length, max_body, max_depth, length = _ASK.unpack(ask)
        body = source.read(length)
        try:
            status, payload = 0, checked_infer_body(body, CODINGS[coding], None if header_length < 0 else header_length,
                                                    max_body, max_depth)
        except Refused as refused:
            status, payload = refused.status, str(refused).encode()
        sink.write(_ANSWER.pack(status, len(payload)) + payload)
        sink.flush()


if __name__ == "__main__":
    serve()
