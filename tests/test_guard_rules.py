"""The HTTP guard's rules checked against models of how Triton 2.51 reads the same input
(src/http_server.cc, rapidjson), with generated inputs (hypothesis): whatever the guard lets
through, Triton reads exactly as the guard did; everything else is refused with a 4xx."""

from __future__ import annotations

import gzip
import json
import math
import re
import time
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from boot_serve.guard_rules import (
    Refused,
    canonical_path,
    check_headers,
    decode_body,
    json_depth,
    route,
    upstream_request,
)
from boot_serve.infer_schema import check_request

LIMIT = 1 << 20
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Models of Triton's readings
# --------------------------------------------------------------------------------------------
def c_atoi(text: bytes) -> int:
    """C's atoi: leading whitespace, an optional sign, then digits up to the first non-digit."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?[0-9]*)", text)
    digits = m.group(1)
    return int(digits) if digits.strip(b"+-") else 0


def triton_accept_encoding(value: str) -> str:
    """Triton's CompressionTypeUsed: highest q among identity/deflate/gzip, first wins a tie;
    std::stod on the q (an out-of-range q throws std::out_of_range, which Triton does not catch)."""
    res, weight = "identity", 0.0
    for encoding in value.split(","):
        start = len(encoding) - len(encoding.lstrip(" "))
        pos = encoding.find(";q=")
        if start == len(encoding) or (pos >= 0 and start >= pos):
            continue
        kind = encoding[start:] if pos < 0 else encoding[start:pos]
        w = 1.0
        if pos >= 0:
            m = re.match(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf(inity)?|nan)", encoding[pos + 3:],
                         re.I)
            if m is None:
                continue
            w = float(m.group(0))
            if math.isinf(w) and "inf" not in m.group(0).lower():
                raise OverflowError("std::out_of_range")
        if kind in ("identity", "deflate", "gzip") and w > weight:
            res, weight = kind, w
    return res


def rapidjson_depth(text: bytes) -> int:
    """How deep a recursive JSON parser goes before it stops (at the end, or at its first error),
    scanning strings the way JSON defines them."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ord('"'):
            i += 1
            while i < n and text[i] != ord('"'):
                if text[i] == ord("\\"):
                    if i + 1 >= n or text[i + 1] not in b'"\\/bfnrtu':
                        return deepest  # invalid escape: the parser stops here
                    i += 1
                i += 1
            if i >= n:
                return deepest
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
            if depth < 0:
                return deepest
        elif c == ord("\\"):
            return deepest  # a backslash outside a string: a syntax error
        i += 1
    return deepest


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------
numeric = st.one_of(st.binary(max_size=12), st.from_regex(rb"\A[ +\-0-9xX.eE\t]{1,12}\Z"),
                    st.integers(0, 10**12).map(lambda n: str(n).encode()),
                    st.text(alphabet="0123456789٣൩０", max_size=6).map(lambda t: t.encode()))


@SETTINGS
@given(numeric)
def test_inference_header_length_is_read_as_triton_reads_it_or_refused(value):
    try:
        headers = check_headers([(b"inference-header-content-length", value)], None)
    except Refused as refused:
        assert 400 <= refused.status < 500
        return
    assert headers.header_length == c_atoi(value) == int(value)  # digits only: atoi agrees


accept = st.lists(st.tuples(st.sampled_from(["gzip", "deflate", "identity", "br", "*", "GZIP", "x-gzip", ""]),
                            st.one_of(st.none(), st.sampled_from(["0", "1", "0.5", "0.999", "1.000", "1e999",
                                                                  "2", "-1", "0.1234", " 1", "nan", "1.0001"]))),
                  max_size=4)


@SETTINGS
@given(accept, st.sampled_from([",", ", ", " ,"]))
def test_accept_encoding_picks_what_triton_picks_or_is_refused(parts, sep):
    value = sep.join(name + (f";q={q}" if q is not None else "") for name, q in parts)
    try:
        chosen = check_headers([(b"accept-encoding", value.encode())], None).accept_encoding
    except Refused as refused:
        assert refused.status == 400
        return
    assert (chosen or "identity") == triton_accept_encoding(value)  # never a value stod cannot hold


def test_accept_encoding_that_would_end_triton_is_refused():
    with pytest.raises(OverflowError):
        triton_accept_encoding("gzip;q=1e999")
    with pytest.raises(Refused) as err:
        check_headers([(b"accept-encoding", b"gzip;q=1e999")], None)
    assert err.value.status == 400


@SETTINGS
@given(st.sampled_from([b"content-length", b"content-encoding", b"inference-header-content-length",
                        b"accept-encoding", b"x-anything"]),
       st.binary(min_size=1, max_size=8).filter(lambda b: re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", b)))
def test_control_bytes_in_any_header_get_400(name, value):
    with pytest.raises(Refused) as err:
        check_headers([(name, b"1" + value)], None)
    assert err.value.status == 400


@pytest.mark.parametrize("items, status", [
    ([(b"content-encoding", b"br")], 415),
    ([(b"content-encoding", b"gzip, gzip")], 415),
    ([(b"content-encoding", b"gzip;q=1")], 400),
    ([(b"inference-header-content-length", b"1"), (b"inference-header-content-length", b"1")], 400),
    ([(b"content-encoding", b"gzip"), (b"Content-Encoding".lower(), b"deflate")], 400),
    ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], 400),
    ([(b"expect", b"200-ok")], 417),
    ([(b"accept-encoding", "gzip;q=０".encode())], 400),
])
def test_header_refusals(items, status):
    with pytest.raises(Refused) as err:
        check_headers(items, None)
    assert err.value.status == status


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------
def _auto_inflate(body: bytes) -> bytes:
    """Triton's inflate: zlib with gzip/zlib auto-detection."""
    return zlib.decompressobj(32 + zlib.MAX_WBITS).decompress(body)


payloads = st.binary(max_size=2000)
mangles = st.sampled_from(["none", "truncate", "trail", "crc", "second_member", "raw"])


@SETTINGS
@given(payloads, st.sampled_from(["gzip", "deflate"]), st.sampled_from(["gzip", "deflate"]), mangles)
def test_a_decoded_body_is_exactly_what_triton_would_inflate(data, packed_as, label, mangle):
    body = gzip.compress(data) if packed_as == "gzip" else zlib.compress(data)
    if mangle == "truncate":
        body = body[:-3]
    elif mangle == "trail":
        body += b"junk"
    elif mangle == "crc":
        body = body[:-5] + bytes([body[-5] ^ 1]) + body[-4:]
    elif mangle == "second_member":
        body += body
    elif mangle == "raw":
        c = zlib.compressobj(wbits=-15)
        body = c.compress(data) + c.flush()
    try:
        out = decode_body(body, label, LIMIT)
    except Refused as refused:
        assert refused.status == 400
        return
    assert mangle == "none" and packed_as == label  # anything but the exact labelled format is refused
    assert out == data == _auto_inflate(body)


def test_a_bomb_is_refused_while_it_inflates():
    bomb = gzip.compress(b" " * (200 << 20))  # ~200 KB that inflate to 200 MB
    t = time.perf_counter()
    with pytest.raises(Refused) as err:
        decode_body(bomb, "gzip", LIMIT)
    assert err.value.status == 413 and time.perf_counter() - t < 1.0


json_text = st.text(alphabet='[]{}"\\ a:,0', max_size=300).map(lambda t: "{" + t)


@settings(max_examples=3000, deadline=None)
@given(json_text)
def test_json_depth_bounds_how_deep_a_parser_goes(text):
    data = text.encode()
    try:
        depth = json_depth(data, 6)
    except Refused as refused:
        assert refused.status == 400
        return
    assert rapidjson_depth(data) <= depth <= 6


@pytest.mark.parametrize("data", [
    b'{"a":' + b"[" * 35_000 + b"]" * 35_000 + b"}",          # the known crash
    b'{"a":"\\' + b'"' + b"[" * 100 + b'"}' + b"[" * 100,     # brackets after an escaped quote and a real one
    b'\\"{' + b"[" * 100,                                    # a backslash outside a string
    b'{"a":"' + b"\\\\" * 1000 + b"[" * 100,                 # unterminated after escapes
])
def test_json_refusals(data):
    with pytest.raises(Refused):
        json_depth(data, 16)


def _worst_bodies(n: int) -> dict[str, bytes]:
    return {"escaped quotes": b'{"a":"' + b'\\"' * (n // 2 - 8) + b'"}',
            "backslash runs": b'{"a":"' + b'\\\\\\"' * (n // 4 - 4) + b'"}',
            "unterminated escapes": b'{"a":"' + b"\\\\" * (n // 2 - 8),
            "empty strings": b'{"a":[' + b'"",' * (n // 3 - 4) + b'""]}',
            "shallow brackets": b'{"a":[' + b"[[]]," * (n // 5 - 4) + b"[]]}",
            "brackets in a string": b'{"a":"' + b"[" * (n - 8) + b'"}'}


def test_json_scan_is_linear_in_the_worst_megabytes():
    """Time per byte stays flat from 64 KiB to 1 MiB on every adversarial shape (a quadratic scan
    would take 16 times longer per byte at the larger size)."""
    small, large = _worst_bodies(LIMIT // 16), _worst_bodies(LIMIT)
    for name in large:
        per_byte = [min(_timed(lambda b=bodies[name]: _scan(b)) for _ in range(3)) / len(bodies[name])
                    for bodies in (small, large)]
        assert per_byte[1] < 4 * per_byte[0] + 1e-8, (name, per_byte)
        assert per_byte[1] * LIMIT < 0.5, name


def _scan(data: bytes) -> None:
    try:
        json_depth(data, 16)
    except Refused:
        pass


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------
# Paths and the request Triton gets
# --------------------------------------------------------------------------------------------
MODELS = ("boot_txt2img",)


@pytest.mark.parametrize("method, target, status", [
    ("GET", b"/v2/repository/index", 403), ("POST", b"/v2/repository/index", 403),
    ("POST", b"/v2/repository/models/boot_txt2img/load", 403),
    ("POST", b"/v2/systemsharedmemory/region/r/register", 403), ("GET", b"/v2/cudasharedmemory/status", 403),
    ("GET", b"/v2/trace/setting", 403), ("POST", b"/v2/models/boot_txt2img/trace/setting", 403),
    ("POST", b"/v2/logging", 403), ("GET", b"/v2/models/stats", 403), ("GET", b"/v2/models/boot_txt2img/stats", 403),
    ("GET", b"/v2/%72epository/index", 403), ("GET", b"/v2%2Frepository%2Findex", 403),
    ("POST", b"http://evil/v2/logging", 403), ("GET", b"/v2/models/unet/config", 404),
    ("POST", b"/v2/models/unet/infer", 404), ("POST", b"/v2/models/boot_txt2img/generate", 404),
    ("GET", b"/v2/models/boot_txt2img/../../v2/logging", 404), ("GET", b"/v2//health/ready", 404),
    ("GET", b"/v2/health/ready/", 404), ("GET", b"/v2/models/boot_txt2img/versions/x/ready", 404),
    ("GET", b"/v2/models/boot_txt2img/infer", 405), ("DELETE", b"/v2", 405), ("GET", b"/v2/%zz", 400),
    ("GET", b"*", 400), ("CONNECT", b"evil:443", 400),
])
def test_routes_outside_the_allow_list_are_refused(method, target, status):
    with pytest.raises(Refused) as err:
        route(method, canonical_path(target), MODELS, operator=False)
    assert err.value.status == status


@pytest.mark.parametrize("method, target, path", [
    ("GET", b"/v2", "/v2"), ("GET", b"/v2/health/live", "/v2/health/live"),
    ("GET", b"/v2/health/ready?x=1", "/v2/health/ready"),
    ("GET", b"/v2/models/boot_txt2img", "/v2/models/boot_txt2img"),
    ("GET", b"/v2/models/boot%5Ftxt2img/config", "/v2/models/boot_txt2img/config"),
    ("POST", b"http://host:8000/v2/models/boot_txt2img/versions/1/infer", "/v2/models/boot_txt2img/versions/1/infer"),
])
def test_allowed_routes_go_to_their_canonical_path(method, target, path):
    assert route(method, canonical_path(target), MODELS, operator=False).path == path


def test_statistics_open_to_the_operator_key_only_and_the_key_goes_to_triton():
    key = "k" * 43
    headers = check_headers([(b"boot-operator-key", key.encode())], key)
    assert headers.operator and not check_headers([(b"boot-operator-key", b"wrong")], key).operator
    r = route("GET", "/v2/models/stats", MODELS, headers.operator)
    assert f"boot-operator-key: {key}".encode() in upstream_request(r, headers, b"", "t:1", key)
    public = route("GET", "/v2/health/ready", MODELS, headers.operator)  # the key never rides along elsewhere
    assert b"boot-operator-key" not in upstream_request(public, headers, b"", "t:1", key)


def test_triton_gets_only_what_the_guard_writes():
    headers = check_headers([(b"content-encoding", b"gzip"), (b"accept-encoding", b"deflate;q=0.5, gzip"),
                             (b"x-forwarded-for", b"1.2.3.4"), (b"inference-header-content-length", b"2")], None)
    r = route("POST", canonical_path(b"/v2/models/boot%5ftxt2img/infer?a=b"), MODELS, False)
    sent = upstream_request(r, headers, b"{}xx", "127.0.0.1:1", None)
    assert sent == (b"POST /v2/models/boot_txt2img/infer HTTP/1.1\r\nHost: 127.0.0.1:1\r\nContent-Length: 4\r\n"
                    b"Inference-Header-Content-Length: 2\r\nAccept-Encoding: gzip\r\n\r\n{}xx")


# --------------------------------------------------------------------------------------------
# The inference JSON: nothing Triton sizes memory by is a number the request does not back
# --------------------------------------------------------------------------------------------
DTYPE_BYTES = {"INT64": 8, "FP32": 4, "UINT8": 1, "BOOL": 1}


def first_key_wins(pairs: list) -> dict:
    """rapidjson's FindMember, which Triton reads members with: the first of equal keys."""
    out = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def triton_json_allocation(body: bytes) -> list[tuple[int, int]]:
    """(bytes Triton 2.51 allocates, scalars it then reads) per JSON-data input: it sizes the buffer
    from the shape's element count times the datatype's size (size_t arithmetic, wrapping) before
    reading `data`."""
    request = json.loads(body, object_pairs_hook=first_key_wins)
    out = []
    for tensor in request["inputs"]:
        if "data" not in tensor or "binary_data_size" in tensor.get("parameters", {}):
            continue
        # GetElementCount: 0 for no dims, -1 when a dim is the wildcard -1 (2**64 - 1 read as uint64)
        dims = [d & (2**64 - 1) for d in tensor["shape"]]
        count = -1 if 2**64 - 1 in dims else math.prod(dims) if dims else 0
        stack, leaves = [tensor["data"]], 0
        while stack:
            for item in stack.pop():
                stack.append(item) if isinstance(item, list) else None
                leaves += not isinstance(item, list)
        out.append((count * DTYPE_BYTES[tensor["datatype"]] & (2**64 - 1), leaves))
    return out


_dims = st.one_of(st.integers(0, 4), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**62, 2**64 - 1))
_data = st.recursive(st.lists(st.integers(-5, 5), max_size=6), lambda inner: st.lists(inner, max_size=3),
                     max_leaves=12)


@SETTINGS
@example(shape=[0, 2**64 - 1], data=[], datatype="INT64", decoy=None)  # Triton: the wildcard, 2**64 - 8 bytes
@example(shape=[1, 1], data=[1], datatype="FP32", decoy=[1, 10**12])
@given(shape=st.lists(_dims, min_size=0, max_size=4), data=_data, datatype=st.sampled_from(list(DTYPE_BYTES)),
       decoy=st.one_of(st.none(), st.lists(_dims, min_size=1, max_size=3)))
def test_every_accepted_shape_is_backed_by_the_data_triton_reads(shape, data, datatype, decoy):
    seed = f'{{"name": "SEED", "shape": {json.dumps(shape)}, "datatype": "{datatype}", "data": {json.dumps(data)}}}'
    if decoy is not None:  # a second "shape" key: Triton reads the first
        seed = seed.replace('"shape"', f'"shape": {json.dumps(decoy)}, "shape"', 1)
    body = f'{{"inputs": [{seed}]}}'.encode()
    try:
        check_request(body)
    except Refused as refused:
        assert 400 <= refused.status < 500
        return
    for allocated, leaves in triton_json_allocation(body):
        assert allocated == leaves * DTYPE_BYTES[datatype] <= 8 * len(body)


@pytest.mark.parametrize("body, status, message", [
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "INT64", "data": [1]}], "inputs": []}', 400, "twice"),
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', 400, "NaN"),
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "INT64", "data": [1' + b"0" * 5000 + b"]}]}", 400, "JSON"),
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "INT64", "data": [1]}], "extra": 1}', 400, "unknown field"),
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "INT64", "parameters": {"shared_memory_region": "r"}}]}',
     403, "shared memory"),
    (b'{"inputs": [], "outputs": [{"name": "IMAGE", "parameters": {"shared_memory_region": "r"}}]}', 403,
     "shared memory"),
    (b'{"inputs": [{"name": "S", "shape": [4], "datatype": "INT64", "parameters": {"binary_data_size": 32}}]}', 400,
     "binary bytes"),
    (b'{"inputs": [{"name": "S", "shape": [1], "datatype": "INT64"}]}', 400, "needs 'data'"),
    (b'{"inputs": [], "parameters": {"timeout": -1}}', 400, "timeout"),
    (b'\xef\xbb\xbf{"inputs": []}', 400, "JSON"),
    (b'{"inputs": [{"name": "\xff", "shape": [1], "datatype": "INT64", "data": [1]}]}', 400, "UTF-8"),
])
def test_requests_that_read_two_ways_or_reach_closed_apis_are_refused(body, status, message):
    with pytest.raises(Refused, match=message) as err:
        check_request(body)
    assert err.value.status == status
