"""What the JSON part of an inference request may say before it reaches Triton: the KServe v2
request read strictly, with every number Triton sizes memory by checked against what the request
actually carries.

Why: Triton 2.51's HTTP front end (src/http_server.cc, ParseJsonTritonIO) sizes the buffer of a
JSON-data input from the *shape* the client wrote, `element count x datatype size`, and allocates
it before it reads a single element. A 150-byte request that says `"shape": [1, 1000000000000]`
ends the process (std::bad_alloc); `[1, 2000000000]` makes it zero 16 GB. Nothing in the depth or
size limits sees that, so the guard reads the request the way Triton does and refuses any input
whose shape promises more elements than the request holds.

The reading (refusals are 400 unless noted; no valid request to this server needs what is refused):
- the text is UTF-8 JSON, parsed with Python's json after boot_serve.guard_rules.json_depth has
  bounded its depth; an object with a key twice is refused (Triton's parser takes the first, Python's
  the last: one request must not read two ways); NaN and Infinity are not JSON;
- the request is an object with `inputs` (a list) and optionally `id`, `parameters`, `outputs`;
  its parameters are the ones tritonclient sends (binary_data_output, priority, timeout, sequence_*);
- each input is an object with `name`, `datatype`, `shape` (1 to 8 integers, each 1 .. 2**31) and
  either `data` (a list whose scalar leaves number exactly the shape's product, as Triton demands)
  or parameters.binary_data_size (at least one byte per element, within the binary part);
  shared-memory parameters get 403, like the registration APIs;
- each output is an object with `name` and optionally parameters.binary_data.
"""

from __future__ import annotations

import json
import math

from boot_serve.guard_rules import Refused, decode_body, json_depth

MAX_DIMS = 8
MAX_DIM = 2**31
REQUEST_KEYS = {"id": str, "parameters": dict, "inputs": list, "outputs": list}
REQUEST_PARAMETERS = {"binary_data_output": bool, "priority": int, "timeout": int, "sequence_id": (int, str),
                      "sequence_start": bool, "sequence_end": bool}
INPUT_KEYS = {"name": str, "datatype": str, "shape": list, "data": list, "parameters": dict}
OUTPUT_KEYS = {"name": str, "parameters": dict}
_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer", bool: "true or false"}
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def checked_infer_body(body: bytes, coding: str, header_length: int | None, max_body: int, max_depth: int) -> bytes:
    """The body Triton gets for an inference request as it arrived (`coding`: its Content-Encoding):
    decoded (boot_serve.guard_rules.decode_body) and checked (`check_infer_body`); Refused otherwise."""
    decoded = decode_body(body, coding, max_body)
    check_infer_body(decoded, header_length, max_depth)
    return decoded


def check_infer_body(body: bytes, header_length: int | None, max_depth: int) -> None:
    """An inference body (already decoded): its JSON part (all of it, or the first
    Inference-Header-Content-Length bytes before binary tensors) scanned by `json_depth`, then read
    by `check_request`; Refused otherwise."""
    if header_length is not None and header_length > len(body):
        raise Refused(400, f"Inference-Header-Content-Length {header_length} is over the body's {len(body)} bytes")
    text = body if header_length is None else body[:header_length]
    json_depth(text, max_depth)
    check_request(text, len(body) - len(text))


def check_request(text: bytes, binary_bytes: int = 0) -> None:
    """Refused unless `text` (the JSON part of an inference request, depth already bounded) is a
    request Triton reads without sizing memory from a number the request does not back.
    `binary_bytes`: the length of the binary part after it (Inference-Header-Content-Length)."""
    request = _parse(text)
    _keys(request, REQUEST_KEYS, "the request")
    if "inputs" not in request:
        raise Refused(400, "an inference request needs 'inputs', a list of tensors")
    _parameters(request.get("parameters", {}), REQUEST_PARAMETERS, "the request")
    binary_total = 0
    for i, tensor in enumerate(request["inputs"]):
        binary_total += _input(tensor, i)
    if binary_total > binary_bytes:
        raise Refused(400, f"the inputs' binary_data_size add up to {binary_total} bytes; the request carries "
                           f"{binary_bytes} binary bytes")
    for i, tensor in enumerate(request.get("outputs", [])):
        what = f"outputs[{i}]"
        if not isinstance(tensor, dict):
            raise Refused(400, f"{what} must be an object")
        _keys(tensor, OUTPUT_KEYS, what)
        _parameters(tensor.get("parameters", {}), {"binary_data": bool}, what)


def _parse(text: bytes):
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant)
    except Refused:
        raise
    except UnicodeDecodeError as err:
        raise Refused(400, f"the request JSON is not UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError; so is a 5,000-digit int
        raise Refused(400, f"the request is not valid JSON: {str(err)[:120]}") from None


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Refused(400, f"the request JSON has the key {twice[:40]!r} twice in one object")
    return out


def _constant(name: str):
    raise Refused(400, f"the request JSON holds {name}, which JSON does not allow")


def _keys(value: dict, allowed: dict, what: str) -> None:
    if not isinstance(value, dict):
        raise Refused(400, f"{what} must be a JSON object")
    for key, item in value.items():
        if key not in allowed:
            raise Refused(400, f"{what} has an unknown field {key[:40]!r} (known: {', '.join(allowed)})")
        if not _is(item, allowed[key]):
            raise Refused(400, f"{key!r} in {what} must be {_KIND_NAMES.get(allowed[key], 'an integer or a string')}, "
                               f"got {type(item).__name__}")


def _parameters(value: dict, allowed: dict, what: str) -> None:
    if any(key in SHARED_MEMORY for key in value):
        raise Refused(403, "shared memory is closed on this server: send tensors in the request")
    _keys(value, allowed, f"the parameters of {what}")
    for key, item in value.items():
        if isinstance(item, int) and not isinstance(item, bool) and not 0 <= item < 2**63:
            raise Refused(400, f"parameter {key!r} of {what} is {item}; it must be in [0, 2**63)")


def _is(item, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(item, bool):
        return bool in kinds
    return isinstance(item, kinds)


def _input(tensor, i: int) -> int:
    """Check inputs[i]; the binary bytes it takes (0 for JSON data)."""
    what = f"inputs[{i}]"
    if not isinstance(tensor, dict):
        raise Refused(400, f"{what} must be an object")
    _keys(tensor, INPUT_KEYS, what)
    for key in ("name", "datatype", "shape"):
        if key not in tensor:
            raise Refused(400, f"{what} needs {key!r}")
    what = f"input {tensor['name'][:40]!r}"
    shape = tensor["shape"]
    if not 1 <= len(shape) <= MAX_DIMS or not all(_is(d, int) and 1 <= d <= MAX_DIM for d in shape):
        raise Refused(400, f"{what} has shape {str(shape)[:80]}; a shape is 1 to {MAX_DIMS} integers, each 1 to "
                           f"{MAX_DIM}")
    elements = math.prod(shape)
    parameters = tensor.get("parameters", {})
    _parameters(parameters, {"binary_data_size": int}, what)
    if "binary_data_size" in parameters:
        if "data" in tensor:
            raise Refused(400, f"{what} has both 'data' and binary_data_size")
        size = parameters["binary_data_size"]
        if elements > size:
            raise Refused(400, f"{what} has shape {shape} ({elements} elements) but {size} binary bytes")
        return size
    if "data" not in tensor:
        raise Refused(400, f"{what} needs 'data' or parameters.binary_data_size")
    leaves = _leaves(tensor["data"])
    if leaves != elements:
        raise Refused(400, f"{what} has shape {str(shape)[:80]} ({elements} elements) but its data holds {leaves}")
    return 0


def _leaves(data: list) -> int:
    """How many scalars nested lists hold (iterative: depth is bounded, size is not)."""
    count, stack = 0, [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            else:
                count += 1
    return count
