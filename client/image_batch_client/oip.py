"""How an Open Inference Protocol (KServe v2) body is laid out: JSON, or JSON plus binary tensor data.

The one place that knows the wire format, shared by the client (``image_batch_client.client``) and the
server (``handler.codecs``; build_mar.py packs this file into every archive): no torch, no TorchServe, nothing
but the standard library.

A body is a JSON header, optionally followed by binary tensor data (the binary data extension). The
header's length travels in the ``Inference-Header-Content-Length`` HTTP header; where no header is
available (TorchServe's gRPC API carries none) the JSON header is read by its extent. Binary tensor
data is little-endian and row-major; a BYTES element is a 4-byte little-endian length followed by its
bytes. An input with binary data says how many bytes it has in ``parameters.binary_data_size``; the
chunks follow the header in the order of the inputs, with nothing before, between or after them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
BYTES = "BYTES"
FP32 = "FP32"
# Fixed-size datatypes this module reads and writes as binary data: struct format of one element.
FIXED_SIZE = {FP32: "<f"}
DATATYPES = (BYTES, *FIXED_SIZE)
_LENGTH = struct.Struct("<I")
# A header this project accepts has a handful of brackets (a few per input, one per {"b64": ...} item);
# the scan that finds the header's end stops well before a hostile header could cost noticeable time.
MAX_HEADER_BRACKETS = 100_000
# Up to the next bracket outside strings (or the end): strings are skipped whole, in C.
_NEXT_BRACKET = re.compile(rb'(?:"[^"\\]*+(?:\\.[^"\\]*+)*+\\?+(?:"|\Z)|[^"\[\]{}])*+([\[\]{}]|\Z)',
                           re.DOTALL)


class OipError(ValueError):
    """A body that breaks the protocol: ``status`` (400, or 413 for too many elements) and a message that
    says what is wrong and where."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Tensor:
    """A named tensor. ``data`` is flat and row-major: bytes (or JSON strings) for BYTES, floats for FP32."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Sequence[Any]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: as the request's "binary_data_output" says


@dataclass(frozen=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: the request named no outputs
    binary_output: bool  # the request-level "binary_data_output" parameter
    parameters: dict[str, Any]
    id: str | None


# ---------------------------------------------------------------------------------------------- reading


def header_length(value: str | int, body_size: int) -> int:
    """The validated value of the Inference-Header-Content-Length header."""
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) <= body_size:
        raise OipError(f"{HEADER_LENGTH} must be the byte length of the JSON header, between 1 and the body's "
                       f"{body_size} bytes; got {preview(value)}")
    return int(text)


def json_end(data: bytes | bytearray | memoryview, max_depth: int) -> int:
    """Where the JSON object at the start of ``data`` ends: the header's extent when no length was given.

    Brackets inside strings do not count. A body whose brackets never close is all header (parsing it
    then says what is wrong). Refuses a header nested deeper than ``max_depth`` or with more than
    MAX_HEADER_BRACKETS brackets before it ends, so a hostile body costs milliseconds.
    """
    depth = 0
    for count, match in enumerate(_NEXT_BRACKET.finditer(data), start=1):
        bracket = match.group(1)
        if not bracket:
            break
        depth += 1 if bracket in (b"[", b"{") else -1
        if depth > max_depth:
            raise OipError(f"the JSON body is nested deeper than {max_depth} levels; a request body needs at most 5")
        if depth <= 0:
            return match.end()
        if count > MAX_HEADER_BRACKETS:
            raise OipError(f"the JSON header has more than {MAX_HEADER_BRACKETS} brackets; send the images as "
                           "BYTES elements, not nested JSON")
    return len(data)


def split_body(body: bytes | bytearray | memoryview, length: str | int | None,
               max_depth: int) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary data after it (no copy): by ``length`` when given, else by extent."""
    view = memoryview(body)
    end = header_length(length, len(view)) if length is not None else json_end(view, max_depth)
    return view[:end], view[end:]


def parse_request(header: Any, binary: bytes | bytearray | memoryview, max_elements: int,
                  datatypes: Collection[str] = DATATYPES) -> InferRequest:
    """Validate an inference request header and cut its binary data into tensors.

    Raises OipError (400) for anything that does not add up, and (413) when the inputs hold more than
    ``max_elements`` elements, before any element is copied.
    """
    if not isinstance(header, Mapping):
        raise OipError("an inference request must be a JSON object with \"inputs\"")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("\"inputs\" must be a non-empty list of tensors such as "
                       "{\"name\": \"images\", \"shape\": [2], \"datatype\": \"BYTES\", \"data\": [...]}")
    parameters = _object(header.get("parameters"), "the request's \"parameters\"")
    binary_output = _flag(parameters, "binary_data_output", "the request's parameters")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(f"\"id\" must be a string; got {preview(request_id)}")

    specs = [_input_spec(raw, index, datatypes) for index, raw in enumerate(raw_inputs)]
    total = sum(math.prod(spec[2]) for spec in specs)
    if total > max_elements:
        raise OipError(f"the request has {total} elements in its inputs; the limit is {max_elements} per request",
                       413)
    declared = sum(spec[4] for spec in specs if spec[4] is not None)
    view = memoryview(binary)
    if declared != len(view) and not (declared == 0 and len(view) <= 64 and not bytes(view).strip()):
        raise OipError(f"the inputs declare {declared} bytes of binary data (binary_data_size) but "
                       f"{len(view)} bytes follow the JSON header")

    inputs, offset = [], 0
    for name, datatype, shape, data, size in specs:
        if size is None:
            inputs.append(Tensor(name, datatype, shape, _flatten(data, shape, f"input {name!r}")))
        else:
            chunk = view[offset: offset + size]
            offset += size
            inputs.append(Tensor(name, datatype, shape, decode_binary(chunk, datatype, shape, f"input {name!r}")))
    return InferRequest(inputs, _requested_outputs(header.get("outputs")), binary_output, parameters, request_id)


def decode_binary(chunk: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int],
                  label: str) -> list[Any]:
    """The elements of one tensor's binary data, which must hold exactly ``prod(shape)`` of them;
    ``label`` names the tensor in error messages (e.g. "input 'images'")."""
    count = math.prod(shape)
    view = memoryview(chunk)
    if datatype in FIXED_SIZE:
        item = struct.calcsize(FIXED_SIZE[datatype])
        if len(view) != count * item:
            raise OipError(f"{label}: shape {list(shape)} of {datatype} needs {count * item} bytes; "
                           f"binary_data_size says {len(view)}")
        return list(struct.unpack(f"<{count}{FIXED_SIZE[datatype][1:]}", view))
    elements, offset = [], 0
    while offset < len(view):
        index = len(elements)
        if index == count:
            raise OipError(f"{label}: its binary data holds more than the {count} elements of its shape "
                           f"{list(shape)} ({len(view) - offset} bytes left over)")
        if offset + _LENGTH.size > len(view):
            raise OipError(f"{label}: its binary data ends inside the 4-byte length of element {index}")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(view):
            raise OipError(f"{label}: element {index} declares {size} bytes but only {len(view) - offset} "
                           f"remain of the input's {len(view)}-byte binary data")
        elements.append(bytes(view[offset: offset + size]))
        offset += size
    if len(elements) != count:
        raise OipError(f"{label}: shape {list(shape)} holds {count} elements but its binary data holds "
                       f"{len(elements)}")
    return elements


def split_response(body: bytes | bytearray | memoryview, length: str | int | None) -> dict[str, Tensor]:
    """The outputs of an inference response, JSON or binary, by name (BYTES elements as bytes)."""
    view = memoryview(body)
    end = header_length(length, len(view)) if length is not None else len(view)
    header_view, binary = view[:end], view[end:]
    try:
        header = json.loads(bytes(header_view))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OipError(f"the response's JSON header is not valid JSON: {error}") from None
    outputs = header.get("outputs") if isinstance(header, Mapping) else None
    if not isinstance(outputs, list):
        raise OipError("the response has no \"outputs\" list")
    tensors, offset = {}, 0
    for output in outputs:
        name, datatype, shape, data, size = _input_spec(output, len(tensors), DATATYPES, what="output")
        if size is None:
            elements = _flatten(data, shape, f"output {name!r}")
            if datatype == BYTES:
                elements = [item.encode() if isinstance(item, str) else item for item in elements]
        else:
            if offset + size > len(binary):
                raise OipError(f"output {name!r}: binary_data_size {size} runs past the end of the response")
            elements = decode_binary(binary[offset: offset + size], datatype, shape, f"output {name!r}")
            offset += size
        tensors[name] = Tensor(name, datatype, shape, elements)
    return tensors


# ---------------------------------------------------------------------------------------------- writing


def encode_binary(datatype: str, data: Sequence[Any]) -> bytes:
    """One tensor's binary data: length-prefixed elements for BYTES, packed little-endian values otherwise."""
    if datatype == BYTES:
        parts = []
        for element in data:
            payload = element.encode() if isinstance(element, str) else bytes(element)
            parts += (_LENGTH.pack(len(payload)), payload)
        return b"".join(parts)
    if datatype in FIXED_SIZE:
        return struct.pack(f"<{len(data)}{FIXED_SIZE[datatype][1:]}", *data)
    raise OipError(f"datatype {datatype!r} has no binary form here; use one of {', '.join(DATATYPES)}")


def build_request(inputs: Sequence[Tensor], binary: bool, outputs: Sequence[RequestedOutput] | None = None,
                  parameters: Mapping[str, Any] | None = None,
                  request_id: str | None = None) -> tuple[bytes, int | None]:
    """A request body and, for binary data, the header length to send as Inference-Header-Content-Length.

    In JSON form BYTES elements must be strings (this server reads them as base64).
    """
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    chunks, tensors = [], []
    for tensor in inputs:
        spec: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if binary:
            chunk = encode_binary(tensor.datatype, tensor.data)
            spec["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            spec["data"] = list(tensor.data)
        tensors.append(spec)
    header["inputs"] = tensors
    if outputs is not None:
        header["outputs"] = [{"name": out.name} if out.binary is None
                             else {"name": out.name, "parameters": {"binary_data": out.binary}} for out in outputs]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)


def encode_response(model_name: str, request_id: str | None, outputs: Sequence[Tensor],
                    binary: Collection[str]) -> tuple[bytes, int | None]:
    """A response body and, when an output is binary, the header length for Inference-Header-Content-Length.

    Outputs named in ``binary`` travel as binary data after the header; the others as JSON ``data``.
    """
    header: dict[str, Any] = {"model_name": model_name}
    if request_id is not None:
        header["id"] = request_id
    specs, chunks = [], []
    for tensor in outputs:
        spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.name in binary:
            chunk = encode_binary(tensor.datatype, tensor.data)
            spec["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            spec["data"] = [item.decode() if isinstance(item, (bytes, bytearray)) else item for item in tensor.data]
        specs.append(spec)
    header["outputs"] = specs
    encoded = json.dumps(header).encode()
    if not chunks:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)


# ---------------------------------------------------------------------------------------------- helpers


def _input_spec(raw: Any, index: int, datatypes: Collection[str],
                what: str = "input") -> tuple[str, str, tuple[int, ...], Any, int | None]:
    """(name, datatype, shape, JSON data or None, binary_data_size or None) of one tensor, validated."""
    if not isinstance(raw, Mapping):
        raise OipError(f"{what} {index} must be an object with \"name\", \"shape\", \"datatype\" and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise OipError(f"{what} {index} needs a \"name\" string")
    datatype = raw.get("datatype")
    if datatype not in datatypes:
        raise OipError(f"{what} {name!r}: datatype must be {' or '.join(datatypes)}; got {preview(datatype)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise OipError(f"{what} {name!r}: \"shape\" must be a list of non-negative whole numbers; "
                       f"got {preview(shape)}")
    parameters = _object(raw.get("parameters"), f"the parameters of {what} {name!r}")
    if "shared_memory_region" in parameters:
        raise OipError(f"{what} {name!r}: shared memory is not supported; send the data in the body")
    size = parameters.get("binary_data_size")
    has_data = "data" in raw
    if size is None and not has_data:
        raise OipError(f"{what} {name!r} has no data: give \"data\" or parameters.binary_data_size")
    if size is not None and has_data:
        raise OipError(f"{what} {name!r} has both \"data\" and binary_data_size; give one")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise OipError(f"{what} {name!r}: binary_data_size must be a non-negative whole number of bytes; "
                       f"got {preview(size)}")
    if has_data and not isinstance(raw["data"], list):
        raise OipError(f"{what} {name!r}: \"data\" must be a list")
    return name, datatype, tuple(shape), raw.get("data"), size


def _flatten(data: list[Any], shape: tuple[int, ...], label: str) -> list[Any]:
    """JSON data as a flat list: given flat (``prod(shape)`` scalars) or nested exactly like ``shape``."""
    count = math.prod(shape)
    if not any(isinstance(item, list) for item in data):
        if len(data) != count:
            raise OipError(f"{label}: shape {list(shape)} holds {count} elements but \"data\" has {len(data)}")
        return data
    flat: list[Any] = []

    def walk(level: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(level, list):
                raise OipError(f"{label}: \"data\" is nested deeper than its shape {list(shape)}")
            flat.append(level)
            return
        if not isinstance(level, list) or len(level) != shape[depth]:
            raise OipError(f"{label}: the nesting of \"data\" does not match its shape {list(shape)}")
        for item in level:
            walk(item, depth + 1)

    walk(data, 0)
    return flat


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise OipError("\"outputs\" must be a list such as [{\"name\": \"predictions\"}]")
    outputs = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise OipError(f"requested output {index} must be an object with a \"name\" string")
        parameters = _object(item.get("parameters"), f"the parameters of output {item['name']!r}")
        if "classification" in parameters:
            raise OipError("the classification extension is not supported: every entry already holds the top-k "
                           "classes; ask for more with the request parameter \"topk\"")
        if "shared_memory_region" in parameters:
            raise OipError(f"output {item['name']!r}: shared memory is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise OipError(f"output {item['name']!r}: binary_data must be true or false; got {preview(binary)}")
        outputs.append(RequestedOutput(item["name"], binary))
    names = [output.name for output in outputs]
    if len(set(names)) != len(names):
        raise OipError(f"an output is requested twice: {names}")
    return outputs


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OipError(f"{what} must be a JSON object; got {preview(value)}")
    return dict(value)


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise OipError(f"{key} in {where} must be true or false; got {preview(value)}")
    return value


def preview(value: Any, length: int = 40) -> str:
    """A client's value as error messages show it: printable, at most ``length`` characters and "..."."""
    text = ascii(value)
    return text if len(text) <= length else text[:length] + "..."
