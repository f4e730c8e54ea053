"""Where the HTTP guard checks large request bodies: worker processes, so that reading a hostile
megabyte never holds the interpreter lock of the event loop that serves every other client.

Python's json parser holds the GIL for its whole run (about 0.2 s for the worst megabyte this guard
accepts to read), so a thread does not help; a process does. Bodies under SMALL_BODY (every request
a client of this server normally sends) are checked on the event loop itself, where a check costs
microseconds and a worst case about a millisecond per 4 KiB.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from boot_serve.guard_rules import Refused
from boot_serve.infer_schema import checked_infer_body

SMALL_BODY = 16 << 10  # identity bodies under this are checked inline


class BodyCheckers:
    """A pool of worker processes (forkserver: nothing of the guard's threads is forked) that run
    boot_serve.infer_schema.checked_infer_body; started on first use or by `warm()`."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or min(2, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def warm(self) -> None:
        """Start the workers now, so that the first large request does not wait for them."""
        self._executor().submit(checked_infer_body, b'{"inputs":[]}', "identity", None, 64, 4)

    async def check(self, body: bytes, coding: str, header_length: int | None, max_body: int,
                    max_depth: int) -> bytes:
        """The decoded, checked body (Refused as checked_infer_body raises it); Refused(503) when a
        worker died on it (the pool is replaced: the next request finds working ones)."""
        if coding == "identity" and len(body) < SMALL_BODY:
            return checked_infer_body(body, coding, header_length, max_body, max_depth)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), checked_infer_body, body, coding, header_length,
                                              max_body, max_depth)
        except BrokenProcessPool:
            self.close()
            raise Refused(503, "the guard could not check this request (its checker stopped); try again") from None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"))
        return self._pool
