"""The HTTP guard's worker processes for large bodies: the same decisions as the inline check, a
worker that dies costs one 503 and is replaced, and no worker outlives its guard."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from boot_serve.guard_rules import Refused
from boot_serve.guard_workers import SMALL_BODY, BodyCheckers
from boot_serve.infer_schema import checked_infer_body

LIMIT, DEPTH = 1 << 20, 16


def _request(prompt: str) -> bytes:
    return json.dumps({"inputs": [{"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
                                  {"name": "SEED", "shape": [1, 1], "datatype": "INT64", "data": [0]}]}).encode()


CASES = {
    "large_good": (_request("x" * (2 * SMALL_BODY)), "identity"),
    "large_unbacked_shape": (_request("x" * (2 * SMALL_BODY)).replace(b'"shape": [1, 1], "datatype": "INT64"',
                                                                      b'"shape": [1, 99], "datatype": "INT64"'),
                             "identity"),
    "gzip_good": (gzip.compress(_request("a red circle")), "gzip"),
    "gzip_bomb": (gzip.compress(b" " * (4 << 20)), "gzip"),
    "gzip_deep": (gzip.compress(b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"), "gzip"),
}


def _inline(body: bytes, coding: str):
    try:
        return checked_infer_body(body, coding, None, LIMIT, DEPTH)
    except Refused as refused:
        return refused.status, str(refused)


async def _in_workers(checkers: BodyCheckers, body: bytes, coding: str):
    try:
        return await checkers.check(body, coding, None, LIMIT, DEPTH)
    except Refused as refused:
        return refused.status, str(refused)


def test_workers_decide_as_the_inline_check_and_a_dead_worker_costs_one_503():
    async def run():
        checkers = BodyCheckers(workers=1)
        await checkers.start()
        try:
            for name, (body, coding) in CASES.items():
                assert await _in_workers(checkers, body, coding) == _inline(body, coding), name
            (worker,) = list(checkers._idle._queue)
            worker.kill()
            await worker.wait()
            body, coding = CASES["gzip_good"]
            assert await _in_workers(checkers, body, coding) == (503, "the guard could not check this request "
                                                                      "(its checker stopped); try again")
            assert await _in_workers(checkers, body, coding) == _inline(body, coding)  # replaced
            workers = list(checkers._idle._queue)
        finally:
            await checkers.close()
        assert all(w.returncode is not None for w in workers)

    asyncio.run(run())


@pytest.mark.parametrize("name", ["large_good", "gzip_bomb"])
def test_before_start_every_body_is_checked_inline(name):
    body, coding = CASES[name]
    assert asyncio.run(_in_workers(BodyCheckers(), body, coding)) == _inline(body, coding)
