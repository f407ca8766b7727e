"""Request rows in, responses out: the wire formats, with no torch and no TorchServe.

TorchServe hands the handler one dict per request. Its keys are the multipart field names, or
``body`` for a raw body; JSON bodies arrive already parsed, text bodies as ``str``, anything else as
``bytearray`` (an application/json body that is not pure JSON, such as an Open Inference Protocol body
with binary data, arrives as bytes too). HTTP request headers reach the handler separately, with the
case the client wrote them in. (TorchServe 0.12 does not pass query parameters to the handler.)
This module turns one such row into an ordered list of image payloads, and the engine's results back
into the matching response shape. The Open Inference Protocol's layout lives in ``image_batch_client.oip``
(client/ in the repository; every archive carries a copy).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from image_batch_client import oip

BODY_KEYS = ("body", "data")
OPTION_KEYS = frozenset({"topk", "outputs"})  # multipart fields that are options, never images
DATA_URI_MARKER = ";base64,"
# What a request may ask for per image ("outputs": ["topk", "embedding"]); top-k alone when it names none.
TOPK = "topk"
EMBEDDING = "embedding"
OUTPUT_KINDS = (TOPK, EMBEDDING)
DEFAULT_OUTPUTS = frozenset({TOPK})
# The outputs an Open Inference Protocol request may ask for (each serves one kind), and its default.
OIP_OUTPUTS = {"predictions": TOPK, "embeddings": EMBEDDING}
DEFAULT_OIP_OUTPUTS = ("predictions",)
# Every body this handler understands is at most 5 levels deep; a deeper one is refused before parsing,
# because json.loads recurses once per level (100,000 levels raise RecursionError, not a clean error).
MAX_JSON_DEPTH = 32
# Up to the next bracket outside strings (or the end): JSON strings are skipped whole (possessively, so an
# unterminated one ends the scan instead of backtracking), in C; Python then does one step per bracket.
_NEXT_BRACKET = re.compile(rb'(?:"[^"\\]*+(?:\\.[^"\\]*+)*+\\?+(?:"|\Z)|[^"\[\]{}])*+([\[\]{}]|\Z)',
                           re.DOTALL)


@dataclass(frozen=True)
class ImageError:
    """Why one image could not be classified; it becomes that image's entry in the response."""

    status: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message}}


class RequestError(Exception):
    """The request as a whole is unusable: it gets this HTTP status and message, nothing else."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message}}


Payload = bytes | ImageError


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_image_bytes: int
    max_topk: int


@dataclass(frozen=True)
class ParsedRequest:
    payloads: list[Payload]
    envelope: str  # "plain", "kserve_v1" or "kserve_v2"
    topk: int | None = None
    request_id: str | None = None  # KServe v2 echoes the caller's id
    outputs: tuple[oip.RequestedOutput, ...] = ()  # KServe v2: the outputs to answer, each JSON or binary
    kinds: frozenset[str] = DEFAULT_OUTPUTS  # what each image's entry holds: topk, embedding, or both


@dataclass(frozen=True)
class Response:
    """One request's answer: its body and the HTTP headers that say how to read it."""

    body: str | bytes
    content_type: str = oip.JSON_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def parse_request(row: Mapping[str, Any], limits: Limits, header_length: str | None = None) -> ParsedRequest:
    """Turn one TorchServe request row into ordered payloads; raise RequestError if unusable.

    ``header_length`` is the request's Inference-Header-Content-Length header, when it has one.
    """
    if not isinstance(row, Mapping):
        raise RequestError(400, "the request could not be read")
    topk = _parse_topk(row.get("topk"), limits)
    kinds = _parse_output_kinds(row.get("outputs"))
    image_fields = [(key, value) for key, value in row.items() if key not in OPTION_KEYS]
    if not image_fields:
        raise RequestError(400, "the request contains no image: send the image as the body, as multipart "
                                "file fields, or as JSON {\"images\": [\"<base64>\", ...]}")

    if len(image_fields) == 1 and image_fields[0][0] in BODY_KEYS:
        # JSON bodies are counted before decoding base64
        parsed = _parse_body(image_fields[0][1], limits, header_length)
    else:
        _check_count(len(image_fields), limits)
        parsed = ParsedRequest([_field_payload(key, value, limits) for key, value in image_fields], "plain")
    if topk is not None:
        parsed = replace(parsed, topk=topk)
    if kinds is not None:
        parsed = replace(parsed, kinds=kinds)
    return parsed


def json_nested_deeper_than(text: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest more than ``limit`` levels (brackets inside
    strings do not count). Stops at the first bracket past the limit, so a hostile body costs microseconds."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False  # every body we accept: a handful of brackets around long base64 strings
    depth = 0
    for match in _NEXT_BRACKET.finditer(text):
        bracket = match.group(1)
        if not bracket:
            return False
        depth += 1 if bracket in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def _load_json(text: bytes) -> Any:
    if json_nested_deeper_than(text, MAX_JSON_DEPTH):
        raise RequestError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels; "
                                f"a request body needs at most 5")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:  # unreachable after the depth check; kept so no body can escape as an exception
        raise RequestError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None


def _parse_body(body: Any, limits: Limits, header_length: str | None) -> ParsedRequest:
    binary = memoryview(b"")  # what follows a JSON header: Open Inference Protocol binary tensor data
    if isinstance(body, str):
        text = body.encode("utf-8", "surrogatepass")
        if not _looks_like_json(text):
            return ParsedRequest([_base64_payload(body, 0, limits)], "plain")
        body = text
    if isinstance(body, (bytes, bytearray)) and _looks_like_json(body):
        body, binary = _split_json_body(body, header_length)

    if isinstance(body, (bytes, bytearray)):
        if len(body) == 0:
            raise RequestError(400, "the request body is empty: send an image")
        return ParsedRequest([_raw_payload(body, 0, limits)], "plain")
    if isinstance(body, Mapping):
        if "inputs" in body:
            return _parse_kserve_v2(body, binary, limits, _parse_topk(body.get("topk"), limits))
        if len(binary) > 64 or bytes(binary).strip():
            raise RequestError(400, f"{len(binary)} bytes follow the JSON body; only an Open Inference Protocol "
                                    "request ({\"inputs\": [...]}) may carry binary data after its JSON header")
        return _parse_json_object(body, limits)
    raise RequestError(
        400,
        "a JSON body must be an object such as {\"images\": [\"<base64>\", ...]}; "
        f"got a JSON {_json_kind(body)}",
    )


def _split_json_body(body: bytes | bytearray, header_length: str | None) -> tuple[Any, memoryview]:
    """The parsed JSON header and the bytes after it: by the given header length, or by the extent of the
    JSON object the body starts with (arrays are read whole)."""
    view = memoryview(body)
    if header_length is None and bytes(view[:64]).lstrip()[:1] != b"{":
        return _load_json(bytes(view)), view[len(view):]
    try:
        header, binary = oip.split_body(view, header_length, MAX_JSON_DEPTH)
    except oip.OipError as error:
        raise RequestError(error.status, error.message) from None
    return _load_json(bytes(header)), binary


def _parse_json_object(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    topk = _parse_topk(body.get("topk"), limits)
    kinds = _parse_output_kinds(body.get("outputs")) or DEFAULT_OUTPUTS
    if "images" in body:
        images = body["images"]
        if not isinstance(images, list):
            raise RequestError(400, "\"images\" must be a list of base64 strings")
        _check_count(len(images), limits)
        payloads = [_json_item_payload(item, i, limits) for i, item in enumerate(images)]
        return ParsedRequest(payloads, "plain", topk, kinds=kinds)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise RequestError(400, "\"instances\" must be a list like [{\"data\": \"<base64>\"}]")
        _check_count(len(instances), limits)
        payloads = [_kserve_v1_payload(item, i, limits) for i, item in enumerate(instances)]
        return ParsedRequest(payloads, "kserve_v1", topk, kinds=kinds)
    raise RequestError(
        400,
        "unrecognised JSON body: expected {\"images\": [...]}, KServe v1 {\"instances\": [...]} "
        "or KServe v2 {\"inputs\": [...]}",
    )


def _parse_kserve_v2(body: Mapping[str, Any], binary: memoryview, limits: Limits,
                     topk: int | None) -> ParsedRequest:
    """An Open Inference Protocol request: BYTES inputs, as base64 strings in JSON or raw binary data."""
    try:
        request = oip.parse_request(body, binary, limits.max_images, datatypes=(oip.BYTES,))
    except oip.OipError as error:
        raise RequestError(error.status, error.message) from None
    if "topk" in request.parameters:
        topk = _parse_topk(request.parameters["topk"], limits)
    items = [item for tensor in request.inputs for item in tensor.data]
    _check_count(len(items), limits)
    payloads = [_oip_item_payload(item, i, limits) for i, item in enumerate(items)]
    outputs = _resolve_outputs(request)
    kinds = frozenset(OIP_OUTPUTS[output.name] for output in outputs)
    return ParsedRequest(payloads, "kserve_v2", topk, request.id, outputs, kinds)


def _resolve_outputs(request: oip.InferRequest) -> tuple[oip.RequestedOutput, ...]:
    """The outputs to answer, each decided JSON or binary (an output's binary_data beats binary_data_output)."""
    if request.outputs is None:
        return tuple(oip.RequestedOutput(name, request.binary_output) for name in DEFAULT_OIP_OUTPUTS)
    if not request.outputs:
        raise RequestError(400, f"\"outputs\" is empty: name one or more of {', '.join(OIP_OUTPUTS)}, or leave it "
                                f"out for predictions")
    unknown = [output.name for output in request.outputs if output.name not in OIP_OUTPUTS]
    if unknown:
        raise RequestError(400, f"unknown output {unknown[0]!r}; this model answers {', '.join(OIP_OUTPUTS)}")
    return tuple(oip.RequestedOutput(output.name, request.binary_output if output.binary is None else output.binary)
                 for output in request.outputs)


def _oip_item_payload(item: Any, index: int, limits: Limits) -> Payload:
    """A BYTES element: raw bytes from binary data, base64 text from JSON data."""
    if isinstance(item, bytes):
        return _raw_payload(item, index, limits) if item else ImageError(400, f"image {index} is empty")
    return _json_item_payload(item, index, limits)


def _kserve_v1_payload(instance: Any, index: int, limits: Limits) -> Payload:
    if isinstance(instance, Mapping):
        for key in ("data", "b64"):
            if key in instance:
                return _json_item_payload(instance[key], index, limits)
        return ImageError(400, f"instance {index} has no \"data\" or \"b64\" field")
    return _json_item_payload(instance, index, limits)


def _json_item_payload(item: Any, index: int, limits: Limits) -> Payload:
    if isinstance(item, Mapping) and "b64" in item:
        item = item["b64"]
    if not isinstance(item, str):
        return ImageError(400, f"image {index} must be a base64 string; got a JSON {_json_kind(item)}")
    return _base64_payload(item, index, limits)


def _field_payload(name: str, value: Any, limits: Limits) -> Payload:
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 0:
            return ImageError(400, f"field {name!r} is empty")
        return _raw_payload(value, name, limits)
    if isinstance(value, str):
        return _base64_payload(value, name, limits)
    return ImageError(400, f"field {name!r} must be an image file; got JSON")


def _raw_payload(data: bytes | bytearray, label: int | str, limits: Limits) -> Payload:
    if len(data) > limits.max_image_bytes:
        return ImageError(
            413, f"image {label} is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes per image"
        )
    return bytes(data)


def _base64_payload(text: str, label: int | str, limits: Limits) -> Payload:
    marker = text.find(DATA_URI_MARKER, 0, 100)
    if text.startswith("data:") and marker != -1:
        text = text[marker + len(DATA_URI_MARKER):]
    text = text.strip()
    if not text:
        return ImageError(400, f"image {label} is empty")
    if len(text) * 3 // 4 > limits.max_image_bytes + 2:
        return ImageError(413, f"image {label} is larger than the limit of {limits.max_image_bytes} bytes per image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return ImageError(400, f"image {label} is not valid base64")
    return _raw_payload(data, label, limits)


def _parse_output_kinds(value: Any) -> frozenset[str] | None:
    """The "outputs" option: a JSON list of names, or comma-separated names (a multipart field)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    expected = f"outputs must name one or more of {', '.join(OUTPUT_KINDS)}, e.g. [\"topk\", \"embedding\"]"
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise RequestError(400, f"{expected}; got {oip.preview(value)}")
    unknown = [name for name in names if name not in OUTPUT_KINDS]
    if unknown:
        raise RequestError(400, f"{expected}; {oip.preview(unknown[0])} is not one of them")
    return frozenset(names)


def _parse_topk(value: Any, limits: Limits) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"topk must be a whole number; got {oip.preview(value)}")
    topk = value
    if not 1 <= topk <= limits.max_topk:
        raise RequestError(400, f"topk must be between 1 and {limits.max_topk}; got {oip.preview(topk)}")
    return topk


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (null, boolean, number, string, array, object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise RequestError(400, "the request contains no image")
    if count > limits.max_images:
        raise RequestError(
            413, f"the request has {count} images; the limit is {limits.max_images} per request"
        )


def _looks_like_json(data: bytes | bytearray) -> bool:
    return bytes(data[:64]).lstrip()[:1] in (b"{", b"[")


def encode_response(parsed: ParsedRequest, entries: Sequence[dict[str, Any]], model_name: str,
                    tensors: Mapping[str, oip.Tensor] | None = None) -> Response:
    """The per-image entries in the shape the request came in.

    An Open Inference Protocol request gets the outputs it asked for, each as JSON data or binary data:
    ``predictions`` (BYTES, one JSON entry per image) is made here from the entries; any other output it
    may ask for (see OIP_OUTPUTS) comes ready-made in ``tensors``, by name.
    """
    if parsed.envelope == "kserve_v1":
        return Response(json.dumps({"predictions": list(entries)}))
    if parsed.envelope == "kserve_v2":
        available = {"predictions": predictions_tensor(entries), **(tensors or {})}
        outputs = [available[output.name] for output in parsed.outputs]
        binary = {output.name for output in parsed.outputs if output.binary}
        body, length = oip.encode_response(model_name, parsed.request_id, outputs, binary)
        if length is None:
            return Response(body.decode())
        return Response(body, oip.BINARY_CONTENT_TYPE, {oip.HEADER_LENGTH: str(length)})
    return Response(json.dumps(list(entries)))


def predictions_tensor(entries: Sequence[dict[str, Any]]) -> oip.Tensor:
    """The ``predictions`` output: one BYTES element per image, the image's entry as JSON text."""
    return oip.Tensor("predictions", oip.BYTES, (len(entries),), [json.dumps(entry).encode() for entry in entries])
