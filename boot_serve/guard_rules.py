"""What the HTTP guard lets through to Triton, and in which form: pure functions over one request
that h11 has already framed (boot_serve.http_guard runs them).

The guard never forwards what a client sent; it forwards a request it writes itself from what
these rules accepted (`upstream_request`): the canonical path, the body decoded (Triton never
inflates anything), and only the headers Triton needs, each in one canonical spelling. So a
header Triton would read leniently, an encoding it would auto-detect, a path it would match
differently, never reaches it. Every header these rules or Triton interpret must match a strict
grammar; anything else is refused with a 4xx and a message (`Refused`).

Triton 2.51's HTTP front end, as read from its source (src/http_server.cc): it routes on the raw
path with RE2 full matches; reads Content-Length and Inference-Header-Content-Length with `atoi`
(`+12`, `12abc`, ` 12` all parse); inflates gzip/deflate bodies with zlib's format
auto-detection; picks a response compression from Accept-Encoding with `std::stod` (a q-value
out of double range throws past its handler and ends the process); and parses the JSON part of
an inference request with a recursive parser (about 35,000 nested arrays overflow its stack).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from boot_serve.access import KEY_HEADER, key_matches


class Refused(Exception):
    """A request the guard answers itself: HTTP `status` with `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# Routes: an allow-list over Triton's endpoints
# --------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # a model name as this project writes them
_VERSION = re.compile(r"[0-9]{1,18}")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_CLOSED_PREFIXES = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/trace",
                    "/v2/logging")
_CLOSED_MODEL_KINDS = ("trace",)
_PUBLIC_MODEL_KINDS = {"": "GET", "ready": "GET", "config": "GET", "infer": "POST"}


@dataclass(frozen=True)
class Route:
    """Where an accepted request goes: `path` (canonical) with `method`; `infer`: it carries an
    inference body; `operator`: the operator key goes along to Triton."""

    method: str
    path: str
    infer: bool = False
    operator: bool = False


def canonical_path(target: bytes) -> str:
    """The path of a request target (origin form, or absolute form `http://host/path`), query
    dropped, percent-escapes decoded once; Refused(400) for anything else, Refused(404) for a path
    no endpoint can have (empty, '.' or '..' segments, characters outside [A-Za-z0-9_.-/])."""
    if target.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        raise Refused(400, f"the request target must be a path, got {target[:60]!r}")
    path = target.split(b"?", 1)[0]
    if b"#" in path:
        raise Refused(400, "a request target carries no fragment")
    if b"%" in path:
        if path.count(b"%") != len(_PERCENT.findall(path)):
            raise Refused(400, f"malformed percent-escape in {path[:60]!r}")
        path = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), path)
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(404, "no endpoint has a path with non-ASCII characters") from None
    segments = text.split("/")[1:]
    if text != "/v2" and not all(_NAME.fullmatch(s) and s not in (".", "..") for s in segments):
        raise Refused(404, f"no endpoint at {text[:80]!r}")
    return text


def route(method: str, path: str, models: tuple[str, ...] | None, operator: bool) -> Route:
    """The Route of (method, canonical path); Refused 403 (closed API), 404 (no such endpoint or
    model), 405 (wrong method). `operator`: the request presented the operator key."""
    if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        return _method(Route("GET", path), method)
    if path.startswith(_CLOSED_PREFIXES):
        raise Refused(403, f"{path[:80]} is closed on this server: clients reach health, metadata, model config "
                           "and inference only")
    if path == "/v2/models/stats":
        return _operator(_method(Route("GET", path, operator=True), method), operator)
    parts = path.split("/")  # '', 'v2', 'models', name, ['versions', v], [kind]
    if len(parts) < 4 or parts[:3] != ["", "v2", "models"]:
        raise Refused(404, f"no endpoint at {path[:80]!r}")
    name, rest = parts[3], parts[4:]
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not _VERSION.fullmatch(rest[1]):
            raise Refused(404, f"no endpoint at {path[:80]!r}")
        rest = rest[2:]
    if len(rest) > 1 or (rest and rest[0] not in (*_PUBLIC_MODEL_KINDS, "stats", *_CLOSED_MODEL_KINDS)):
        if rest[:2] == ["trace", "setting"]:
            raise Refused(403, "trace settings are closed on this server")
        raise Refused(404, f"no endpoint at {path[:80]!r}")
    if models is not None and name not in models:
        raise Refused(404, f"no model named {name!r} is served here (served: {', '.join(models)})")
    kind = rest[0] if rest else ""
    if kind == "stats":
        return _operator(_method(Route("GET", path, operator=True), method), operator)
    return _method(Route(_PUBLIC_MODEL_KINDS[kind], path, infer=kind == "infer"), method)


def _method(r: Route, method: str) -> Route:
    if method != r.method:
        raise Refused(405, f"{r.path} takes {r.method}, not {method[:16]}")
    return r


def _operator(r: Route, operator: bool) -> Route:
    if not operator:
        raise Refused(403, f"statistics are for operators: present the {KEY_HEADER} header")
    return r


# --------------------------------------------------------------------------------------------
# Headers: strict grammars for every header the guard or Triton interprets
# --------------------------------------------------------------------------------------------
INTERPRETED = (b"content-length", b"transfer-encoding", b"content-encoding", b"accept-encoding",
               b"inference-header-content-length", b"expect", KEY_HEADER.encode(), b"host")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,10}")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CODING = re.compile(rb"[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*(?:;[ \t]*[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?))?"
                     rb"[ \t]*")
DECODABLE = ("gzip", "deflate", "identity")


@dataclass(frozen=True)
class Headers:
    """What the guard took from a request's headers."""

    content_encoding: str = "identity"
    header_length: int | None = None  # Inference-Header-Content-Length
    accept_encoding: str | None = None  # the response compression Triton would pick, if any
    expect_continue: bool = False
    operator: bool = False


def check_headers(items: list[tuple[bytes, bytes]], operator_key: str | None) -> Headers:
    """Headers (lower-case names, as h11 gives them) checked; Refused(400/415/417) otherwise."""
    seen: dict[bytes, bytes] = {}
    for name, value in items:
        if _CONTROL.search(value):
            raise Refused(400, f"header {name.decode('latin-1')} carries control bytes")
        if name in INTERPRETED:
            if name in seen and name != b"content-length":  # h11 already merged equal Content-Lengths
                raise Refused(400, f"header {name.decode()} appears more than once")
            if not value.isascii():
                raise Refused(400, f"header {name.decode()} carries non-ASCII bytes")
            seen[name] = value
    if b"transfer-encoding" in seen and b"content-length" in seen:
        raise Refused(400, "a request carries Content-Length or Transfer-Encoding, not both")
    out = {}
    if b"content-encoding" in seen:
        out["content_encoding"] = _content_encoding(seen[b"content-encoding"])
    if b"inference-header-content-length" in seen:
        value = seen[b"inference-header-content-length"]
        if not _DIGITS.fullmatch(value):
            raise Refused(400, f"Inference-Header-Content-Length must be a byte count (digits only), got "
                               f"{value[:24].decode()!r}")
        out["header_length"] = int(value)
    if b"accept-encoding" in seen:
        out["accept_encoding"] = _accept_encoding(seen[b"accept-encoding"])
    if b"expect" in seen:
        if seen[b"expect"].strip().lower() != b"100-continue":
            raise Refused(417, "the only expectation this server meets is 100-continue")
        out["expect_continue"] = True
    out["operator"] = key_matches(seen.get(KEY_HEADER.encode()), operator_key)
    return Headers(**out)


def _content_encoding(value: bytes) -> str:
    codings = [c.strip() for c in value.split(b",")]
    if not all(_TOKEN.fullmatch(c) for c in codings):
        raise Refused(400, f"malformed Content-Encoding {value[:40].decode()!r}")
    if len(codings) > 1:
        raise Refused(415, "one Content-Encoding per request: gzip, deflate or identity")
    coding = codings[0].decode().lower()
    if coding not in DECODABLE:
        raise Refused(415, f"Content-Encoding {coding[:20]!r} is not supported: use gzip, deflate or identity")
    return coding


def _accept_encoding(value: bytes) -> str | None:
    """The coding Triton picks for this Accept-Encoding, once the whole value matched RFC 9110's
    grammar (so every q-value is a number in [0, 1] that Triton's std::stod can hold). The pick is
    Triton's own rule, spaces and all: per comma-separated element, the name runs from its first
    non-space to a literal ";q=" (or the end); the highest q among exactly "identity", "deflate" and
    "gzip" wins, the first on a tie."""
    if not all(_CODING.fullmatch(part) or not part.strip(b" \t") for part in value.split(b",")):
        raise Refused(400, f"malformed Accept-Encoding {value[:60].decode()!r}")
    best, weight = "identity", 0.0
    for element in value.decode("ascii").split(","):
        start = len(element) - len(element.lstrip(" "))
        at = element.find(";q=")
        if start == len(element) or (at >= 0 and start >= at):
            continue
        name = element[start:] if at < 0 else element[start:at]
        q = 1.0 if at < 0 else float(re.match(r"\s*([0-9.]+)", element[at + 3:]).group(1))
        if name in DECODABLE and q > weight:
            best, weight = name, q
    return None if best == "identity" else best


# --------------------------------------------------------------------------------------------
# Bodies: decoded here, JSON structure scanned in linear time
# --------------------------------------------------------------------------------------------
def decode_body(body: bytes, coding: str, limit: int) -> bytes:
    """The body as Triton would see it after inflating, checked to be exactly what its label says:
    one complete gzip member (CRC and length checked) or one zlib stream (Adler-32 checked), no
    trailing bytes. Refused(400) otherwise, Refused(413) as soon as it inflates past `limit`."""
    if coding == "identity":
        return body
    is_gzip = body[:2] == b"\x1f\x8b"
    is_zlib = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
    if (coding == "gzip" and not is_gzip) or (coding == "deflate" and not is_zlib):
        found = "gzip" if is_gzip else "zlib deflate" if is_zlib else "neither gzip nor zlib deflate"
        raise Refused(400, f"the body is labelled Content-Encoding {coding} but is {found}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise Refused(400, f"the {coding} body does not decode: {err}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Refused(413, f"the request body inflates ({coding}) to over {limit} bytes; this server accepts at "
                           f"most {limit}")
    if not inflater.eof:
        raise Refused(400, f"the {coding} body is truncated")
    if inflater.unused_data:
        raise Refused(400, f"the {coding} body has {len(inflater.unused_data)} bytes after its end")
    return out


_STEP = np.zeros(256, np.int8)  # +1 for an opening bracket, -1 for a closing one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_WHITESPACE = b" \t\r\n"


def json_depth(data: bytes, limit: int, require_object: bool = True) -> int:
    """The nesting depth of JSON text `data`, or Refused(400) when it passes `limit`, is not an
    object, or its strings and brackets do not balance.

    Strings are found the way every JSON parser finds them: a quote opens or closes one unless an
    odd run of backslashes precedes it; a backslash outside a string is refused, so no input can
    be read two ways. Brackets outside strings then give the depth by a running sum. All of it is
    whole-array numpy work, linear in len(data), with no per-byte Python."""
    start = len(data) - len(data.lstrip(_WHITESPACE))
    if require_object and (start == len(data) or data[start] != ord("{")):
        raise Refused(400, "the request JSON must be an object")
    if not data:
        return 0
    a = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(a == ord('"'))
    slash = a == ord("\\")
    any_slash = bool(slash.any())
    if any_slash and len(quotes):
        # Length of the backslash run just before each quote: (q - 1) - (last non-backslash before q).
        last = np.maximum.accumulate(np.where(slash, -1, np.arange(len(a), dtype=np.int32)))
        before = np.maximum(quotes - 1, 0)
        run = np.where(quotes > 0, before - last[before], 0)
        quotes = quotes[run % 2 == 0]
    if len(quotes) % 2:
        raise Refused(400, "the request JSON has an unterminated string")
    mark = np.zeros(len(a), np.uint8)
    mark[quotes] = 1
    inside = np.bitwise_xor.accumulate(mark)  # 1 from an opening quote up to (not incl.) its closing one
    if any_slash and np.any(slash & (inside == 0)):
        raise Refused(400, "the request JSON has a backslash outside a string")
    depth = np.cumsum(_STEP[a] * (inside == 0), dtype=np.int32)
    deepest = int(depth.max())
    if deepest > limit:
        raise Refused(400, f"the request JSON nests more than {limit} levels deep; no valid request to this server "
                           "needs that")
    if depth.min() < 0 or depth[-1] != 0:
        raise Refused(400, "the request JSON's brackets do not balance")
    return deepest


def nests_deeper(data: bytes, limit: int) -> bool:
    """Whether JSON text `data` nests arrays/objects more than `limit` levels deep (brackets inside
    strings do not count)."""
    try:
        json_depth(data, limit, require_object=False)
    except Refused as refused:
        return "levels deep" in str(refused)
    return False


# --------------------------------------------------------------------------------------------
# The request Triton gets
# --------------------------------------------------------------------------------------------
def upstream_request(r: Route, headers: Headers, body: bytes, host: str, operator_key: str | None) -> bytes:
    """The HTTP/1.1 request the guard writes to Triton for an accepted one: nothing the client
    wrote reaches Triton except the canonical path and the checked body."""
    lines = [f"{r.method} {r.path} HTTP/1.1", f"Host: {host}"]
    if r.infer:
        lines.append(f"Content-Length: {len(body)}")
        if headers.header_length is not None:
            lines.append(f"Inference-Header-Content-Length: {headers.header_length}")
        if headers.accept_encoding:
            lines.append(f"Accept-Encoding: {headers.accept_encoding}")
    if r.operator and operator_key:
        lines.append(f"{KEY_HEADER}: {operator_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if r.infer else b"")
