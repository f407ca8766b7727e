"""The Open Inference Protocol layout (client/image_batch_client/oip.py): round trips, tritonclient's bodies, every
malformed case."""

import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from image_batch_client import oip
from image_batch_client.oip import OipError, RequestedOutput, Tensor

# Elements chosen to trip a careless parser: empty, JSON-looking, quotes and brackets, every byte value.
AWKWARD = [b"", b'{"inputs": []}', b'"]}\\', bytes(range(256)) * 40, b"\xff\xd8\xff\xe0 a JPEG-ish start"]


def parse(body: bytes, length, max_elements: int = 100, **kwargs) -> oip.InferRequest:
    header, binary = oip.split_body(body, length, max_depth=32)
    return oip.parse_request(json.loads(bytes(header)), binary, max_elements, **kwargs)


def triton_input(name: str, elements: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


@pytest.mark.parametrize("with_length", [True, False])
def test_binary_request_round_trip(with_length):
    inputs = [Tensor("images", oip.BYTES, (len(AWKWARD),), AWKWARD), Tensor("more", oip.BYTES, (2,), [b"a", b"bc"])]
    body, length = oip.build_request(inputs, binary=True, outputs=[RequestedOutput("predictions", True)],
                                     parameters={"topk": 3}, request_id="r-1")
    assert length is not None and body[length:length + 4] == struct.pack("<I", 0)  # the empty element's length
    request = parse(body, str(length) if with_length else None)
    assert [t.data for t in request.inputs] == [AWKWARD, [b"a", b"bc"]]
    assert [t.shape for t in request.inputs] == [(len(AWKWARD),), (2,)]
    assert request.outputs == [RequestedOutput("predictions", True)]
    assert request.parameters == {"topk": 3} and request.id == "r-1" and request.binary_output is False


def test_json_request_round_trip_and_nested_data():
    body, length = oip.build_request([Tensor("images", oip.BYTES, (2,), ["YQ==", "Yg=="])], binary=False)
    assert length is None
    assert parse(body, None).inputs[0].data == ["YQ==", "Yg=="]
    nested = {"inputs": [{"name": "i", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}]}
    assert oip.parse_request(nested, b"", 10).inputs[0].data == ["a", "b"]


@pytest.mark.parametrize("with_length", [True, False])
def test_tritonclient_binary_body_is_read_exactly(with_length):
    """The reference client's own bytes: header length as it computes it, its BYTES serialization."""
    elements = [b"\x89PNG\r\n\x1a\n...", *AWKWARD]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [triton_input("images", elements, binary=True)], outputs=[triton.InferRequestedOutput("predictions")],
        parameters={"topk": 2})
    request = parse(body, json_size if with_length else None)
    assert request.inputs[0].data == elements
    assert request.outputs == [RequestedOutput("predictions", True)]
    assert request.parameters["topk"] == 2


def test_tritonclient_json_body_and_its_default_binary_output():
    body, json_size = triton.InferenceServerClient.generate_request_body([triton_input("images", [b"YQ=="], False)])
    assert json_size is None
    request = parse(body, None)
    assert request.inputs[0].data == ["YQ=="]
    assert request.outputs is None and request.binary_output is True  # tritonclient asks for binary by default


def test_our_bytes_layout_is_tritonclients():
    elements = np.array(AWKWARD, dtype=np.object_)
    assert oip.encode_binary(oip.BYTES, AWKWARD) == triton.serialize_byte_tensor(elements).item()


@pytest.mark.parametrize("binary", [set(), {"predictions"}, {"predictions", "embeddings"}])
def test_responses_read_by_tritonclient(binary):
    predictions = Tensor("predictions", oip.BYTES, (3,), [b'{"topk": []}', b'{"error": {"status": 415}}', b"{}"])
    embeddings = Tensor("embeddings", oip.FP32, (3, 2), [0.5, -1.0, 2.25, 0.0, 1e-3, 7.0])
    body, length = oip.encode_response("m", "r-9", [predictions, embeddings], binary)
    assert (length is None) == (not binary)
    result = triton.InferResult.from_response_body(body, header_length=length)
    as_bytes = [item.encode() if isinstance(item, str) else bytes(item) for item in result.as_numpy("predictions")]
    assert as_bytes == list(predictions.data)
    assert result.as_numpy("embeddings").reshape(-1).tolist() == pytest.approx(embeddings.data, rel=1e-6)
    assert result.get_response()["id"] == "r-9"
    ours = oip.split_response(body, length)
    assert list(ours["predictions"].data) == list(predictions.data)
    assert ours["embeddings"].data == pytest.approx(embeddings.data, rel=1e-6)
    assert ours["embeddings"].shape == (3, 2)


@pytest.mark.parametrize(
    ("text", "end"),
    [(b'{"a": "}{]["}BINARY', 13), (b'{"a": "\\"}"}{', 12), (b'  {"a": [1, {"b": []}]}]]', 23),
     (b'{"inputs": [', 12), (b'{"a": "unterminated', 19), (b"{}" + b"[" * 100, 2)],
)
def test_json_end_skips_strings_and_stops_at_the_closing_brace(text, end):
    assert oip.json_end(text, max_depth=4) == end


def test_json_end_refuses_deep_or_bracket_heavy_headers_quickly():
    with pytest.raises(OipError, match="nested deeper than 32 levels"):
        oip.json_end(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, max_depth=32)
    with pytest.raises(OipError, match="more than 100000 brackets"):
        oip.json_end(b'{"a": [' + b"[], " * 200_000 + b"[]]}", max_depth=32)


def good_header(**changes):
    header = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 11}}]}
    header.update(changes)
    return header


TWO_ELEMENTS = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)  # 11 bytes: "abc" and an empty element


def with_input(**changes):
    header = good_header()
    header["inputs"][0].update(changes)
    return header


@pytest.mark.parametrize(
    ("header", "binary", "fragment"),
    [
        ([], b"", "must be a JSON object"),
        ({"inputs": []}, b"", "non-empty list"),
        ({"inputs": {"name": "x"}}, b"", "non-empty list"),
        ({"inputs": ["x"]}, b"", "input 0 must be an object"),
        (with_input(name=""), TWO_ELEMENTS, "needs a \"name\""),
        (with_input(datatype="FP16"), TWO_ELEMENTS, "datatype must be BYTES or FP32"),
        (with_input(shape=2), TWO_ELEMENTS, "\"shape\" must be a list"),
        (with_input(shape=[-2]), TWO_ELEMENTS, "\"shape\" must be a list"),
        (with_input(shape=[True]), TWO_ELEMENTS, "\"shape\" must be a list"),
        (with_input(parameters={}), b"", "has no data"),
        (with_input(data=["a", "b"]), TWO_ELEMENTS, "both \"data\" and binary_data_size"),
        (with_input(parameters={"binary_data_size": -1}), b"", "non-negative whole number of bytes"),
        (with_input(parameters={"binary_data_size": "11"}), TWO_ELEMENTS, "non-negative whole number of bytes"),
        (with_input(parameters={"binary_data_size": True}), TWO_ELEMENTS, "non-negative whole number of bytes"),
        (with_input(parameters={"shared_memory_region": "r"}), b"", "shared memory is not supported"),
        (with_input(parameters="big"), TWO_ELEMENTS, "must be a JSON object"),
        (good_header(), TWO_ELEMENTS[:-1], "declare 11 bytes of binary data (binary_data_size) but 10 bytes follow"),
        (good_header(), TWO_ELEMENTS + b"xyz", "declare 11 bytes of binary data (binary_data_size) but 14 bytes"),
        (with_input(parameters={"binary_data_size": 9}), TWO_ELEMENTS[:9], "inside the 4-byte length of element 1"),
        (with_input(parameters={"binary_data_size": 6}), TWO_ELEMENTS[:6], "element 0 declares 3 bytes but only 2"),
        (with_input(shape=[1]), TWO_ELEMENTS, "more than the 1 elements of its shape [1]"),
        (with_input(shape=[3]), TWO_ELEMENTS, "shape [3] holds 3 elements but its binary data holds 2"),
        (with_input(shape=[2, 2]), TWO_ELEMENTS, "shape [2, 2] holds 4 elements but its binary data holds 2"),
        (with_input(datatype="FP32", shape=[3]), TWO_ELEMENTS, "needs 12 bytes; binary_data_size says 11"),
        (with_input(parameters={}, data="ab"), b"", "\"data\" must be a list"),
        (with_input(parameters={}, data=["a"]), b"", "shape [2] holds 2 elements but \"data\" has 1"),
        (with_input(parameters={}, data=[["a"], "b"]), b"", "nested deeper than its shape [2]"),
        (with_input(parameters={}, shape=[2, 1], data=[["a"], ["b", "c"]]), b"", "does not match its shape [2, 1]"),
        (with_input(parameters={}, shape=[2, 1], data=[["a"], "b"]), b"", "does not match its shape [2, 1]"),
        (with_input(parameters={}, shape=[1, 1], data=[[["a"]]]), b"", "nested deeper than its shape [1, 1]"),
        (with_input(parameters={}, data=["a", "b"]), b"stray", "declare 0 bytes of binary data"),
        (good_header(outputs={"name": "predictions"}), TWO_ELEMENTS, "\"outputs\" must be a list"),
        (good_header(outputs=[{"binary_data": True}]), TWO_ELEMENTS, "must be an object with a \"name\""),
        (good_header(outputs=[{"name": "p", "parameters": {"binary_data": "yes"}}]), TWO_ELEMENTS,
         "binary_data must be true or false"),
        (good_header(outputs=[{"name": "p", "parameters": {"classification": 3}}]), TWO_ELEMENTS,
         "classification extension is not supported"),
        (good_header(outputs=[{"name": "p"}, {"name": "p"}]), TWO_ELEMENTS, "requested twice"),
        (good_header(parameters=[1]), TWO_ELEMENTS, "the request's \"parameters\" must be a JSON object"),
        (good_header(parameters={"binary_data_output": 1}), TWO_ELEMENTS, "binary_data_output"),
        (good_header(id=7), TWO_ELEMENTS, "\"id\" must be a string"),
    ],
)
def test_malformed_requests_say_what_is_wrong(header, binary, fragment):
    with pytest.raises(OipError) as error:
        oip.parse_request(header, binary, max_elements=100)
    assert error.value.status == 400
    assert fragment in error.value.message


def test_a_good_header_parses_and_keeps_the_empty_element():
    request = oip.parse_request(good_header(), TWO_ELEMENTS, max_elements=100)
    assert request.inputs[0].data == [b"abc", b""]


def test_too_many_elements_is_413_before_any_element_is_read():
    header = with_input(shape=[10**9], parameters={"binary_data_size": 4})
    with pytest.raises(OipError) as error:
        oip.parse_request(header, b"\x00" * 4, max_elements=64)
    assert error.value.status == 413 and "1000000000 elements" in error.value.message


def test_only_the_accepted_datatypes_are_read():
    header = with_input(datatype="FP32", shape=[2], parameters={"binary_data_size": 8})
    assert oip.parse_request(header, struct.pack("<2f", 1.5, -2), 10).inputs[0].data == [1.5, -2.0]
    with pytest.raises(OipError, match="datatype must be BYTES; got 'FP32'"):
        oip.parse_request(header, struct.pack("<2f", 1.5, -2), 10, datatypes=(oip.BYTES,))


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e3", "999", 0, ""])
def test_header_length_must_be_a_byte_count_inside_the_body(value):
    with pytest.raises(OipError, match="Inference-Header-Content-Length must be the byte length"):
        oip.split_body(b'{"inputs": []}', value, max_depth=32)


def test_whitespace_after_a_pure_json_header_is_allowed():
    body = json.dumps(with_input(parameters={}, data=["a", "b"])).encode() + b"\n"
    assert parse(body, None).inputs[0].data == ["a", "b"]


def test_responses_that_lie_are_refused():
    body, length = oip.encode_response("m", None, [Tensor("p", oip.BYTES, (1,), [b"abc"])], {"p"})
    with pytest.raises(OipError, match="runs past the end"):
        oip.split_response(body[:-1], length)
    with pytest.raises(OipError, match="not valid JSON"):
        oip.split_response(body, length - 1)
    with pytest.raises(OipError, match="no \"outputs\" list"):
        oip.split_response(b'{"error": "x"}', None)
