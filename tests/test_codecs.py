import base64
import json

import pytest

from handler import codecs, oip
from handler.codecs import ImageError, Limits, ParsedRequest, RequestError, encode_response, parse_request

LIMITS = Limits(max_images=4, max_image_bytes=1000, max_topk=1000)
JPEG = b"\xff\xd8\xff\xe0fake-but-nonempty"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_raw_body_is_one_image():
    parsed = parse_request({"body": bytearray(JPEG)}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.envelope == "plain"


def test_multipart_fields_keep_their_order_and_topk_field_is_an_option():
    row = {"b": bytearray(b"2"), "a": bytearray(b"1"), "topk": bytearray(b"3"), "c": bytearray(b"3")}
    parsed = parse_request(row, LIMITS)
    assert parsed.payloads == [b"2", b"1", b"3"]
    assert parsed.topk == 3


def test_multipart_text_field_is_read_as_base64():
    parsed = parse_request({"x": b64(JPEG), "y": bytearray(JPEG)}, LIMITS)
    assert parsed.payloads == [JPEG, JPEG]


def test_json_images_list_parsed_by_torchserve():
    parsed = parse_request({"body": {"images": [b64(JPEG), "data:image/jpeg;base64," + b64(b"xy")]}}, LIMITS)
    assert parsed.payloads == [JPEG, b"xy"]


def test_json_sent_without_content_type_is_still_understood():
    body = bytearray(json.dumps({"images": [b64(JPEG)], "topk": 2}).encode())
    parsed = parse_request({"body": body}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.topk == 2


def test_bad_items_become_per_image_errors_and_keep_their_place():
    parsed = parse_request({"body": {"images": [b64(JPEG), "not base64!", 7, "", b64(b"z" * 2000)]}},
                           Limits(max_images=8, max_image_bytes=1000, max_topk=1000))
    first, bad_b64, wrong_type, empty, too_big = parsed.payloads
    assert first == JPEG
    assert isinstance(bad_b64, ImageError) and bad_b64.status == 400 and "base64" in bad_b64.message
    assert isinstance(wrong_type, ImageError) and "must be a base64 string" in wrong_type.message
    assert isinstance(empty, ImageError) and empty.status == 400
    assert isinstance(too_big, ImageError) and too_big.status == 413


def test_oversized_raw_image_is_413_for_that_image():
    parsed = parse_request({"a": bytearray(b"x" * 1001), "b": bytearray(JPEG)}, LIMITS)
    assert isinstance(parsed.payloads[0], ImageError) and parsed.payloads[0].status == 413
    assert parsed.payloads[1] == JPEG


@pytest.mark.parametrize(
    ("row", "status", "fragment"),
    [
        ({"body": bytearray()}, 400, "body is empty"),
        ({"body": bytearray(b'{"images": [')}, 400, "not valid JSON"),
        ({"body": {"pictures": []}}, 400, "unrecognised JSON body"),
        ({"body": {"images": "abc"}}, 400, "must be a list"),
        ({"body": {"images": []}}, 400, "contains no image"),
        ({"body": [1, 2]}, 400, "must be an object"),
        ({"body": {"images": [b64(JPEG)] * 5}}, 413, "limit is 4 per request"),
        ({f"f{i}": bytearray(JPEG) for i in range(5)}, 413, "limit is 4 per request"),
        ({"body": {"images": [b64(JPEG)], "topk": 0}}, 400, "topk must be between 1 and 1000"),
        ({"body": {"images": [b64(JPEG)], "topk": "many"}}, 400, "topk must be a whole number"),
        ({"topk": bytearray(b"2")}, 400, "contains no image"),
        ({"body": {"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}}, 400, "datatype must be BYTES"),
    ],
)
def test_malformed_requests_are_rejected_as_a_whole(row, status, fragment):
    with pytest.raises(RequestError) as error:
        parse_request(row, LIMITS)
    assert error.value.status == status
    assert fragment in error.value.message


def test_kserve_v1_and_v2_bodies():
    v1 = parse_request({"body": {"instances": [{"data": b64(JPEG)}, {"b64": b64(b"q")}, {"other": 1}]}}, LIMITS)
    assert v1.envelope == "kserve_v1" and v1.payloads[:2] == [JPEG, b"q"]
    assert isinstance(v1.payloads[2], ImageError)
    v2 = parse_request(
        {"body": {"id": "r1", "inputs": [{"name": "img", "shape": [2], "datatype": "BYTES",
                                          "data": [b64(JPEG), b64(b"q")]}]}},
        LIMITS,
    )
    assert v2.envelope == "kserve_v2" and v2.payloads == [JPEG, b"q"] and v2.request_id == "r1"


def test_encode_response_matches_the_request_envelope():
    entries = [{"topk": []}, {"error": {"status": 400, "message": "x"}}]
    for envelope, expected in (("plain", entries), ("kserve_v1", {"predictions": entries})):
        response = encode_response(ParsedRequest([], envelope), entries, "m")
        assert json.loads(response.body) == expected
        assert response.content_type == "application/json" and response.headers == {}
    predictions = (oip.RequestedOutput("predictions", False),)
    v2 = encode_response(ParsedRequest([], "kserve_v2", request_id="r1", outputs=predictions), entries, "m")
    assert v2.content_type == "application/json" and v2.headers == {}
    body = json.loads(v2.body)
    assert body["id"] == "r1" and body["model_name"] == "m"
    assert [json.loads(item) for item in body["outputs"][0]["data"]] == entries
    assert body["outputs"][0]["shape"] == [2]


DEEP_BODIES = {
    "array_100k": b"[" * 100_000 + b"]" * 100_000,
    "images_holding_deep_array": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "object_chain_100k": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "unclosed_33": b"[" * 33,
}


@pytest.mark.parametrize("name", sorted(DEEP_BODIES))
@pytest.mark.parametrize("as_text", [False, True])
def test_json_nested_deeper_than_the_limit_is_refused_before_parsing(name, as_text, monkeypatch):
    def must_not_parse(*args, **kwargs):
        raise AssertionError("json.loads ran on a body deeper than the limit")

    monkeypatch.setattr(codecs.json, "loads", must_not_parse)
    body = DEEP_BODIES[name].decode() if as_text else bytearray(DEEP_BODIES[name])
    with pytest.raises(RequestError) as error:
        parse_request({"body": body}, LIMITS)
    assert error.value.status == 400
    assert f"nested deeper than {codecs.MAX_JSON_DEPTH} levels" in error.value.message


def test_json_at_the_depth_limit_is_parsed_and_brackets_inside_strings_do_not_count():
    at_limit = "[" * (codecs.MAX_JSON_DEPTH - 2)  # inside {"images": [ ... ]}: exactly the limit
    body = '{"images": [' + at_limit + "]" * len(at_limit) + "]}"
    parsed = parse_request({"body": bytearray(body.encode())}, LIMITS)  # parsed: its one item is a list
    assert isinstance(parsed.payloads[0], ImageError) and "got a JSON list" in parsed.payloads[0].message
    in_strings = json.dumps({"images": ["[" * 1000, b64(JPEG)], "note": "{" * 1000})
    parsed = parse_request({"body": bytearray(in_strings.encode())}, LIMITS)
    assert parsed.payloads[1] == JPEG and isinstance(parsed.payloads[0], ImageError)


@pytest.mark.parametrize(
    ("text", "deeper_than_2"),
    [('[[1]]', False), ('[[[1]]]', True), ('["[[[[", {"a": "]]]"}]', False), ('["\\"[[[", [[1]]]', True),
     ('"[[[[', False), ('[[] , [], [[]]]', True), ('{"a": {"b": {}}}', True), ('["\\\\", [[]]]', True)],
)
def test_json_depth_scan_skips_strings_and_escapes(text, deeper_than_2):
    assert codecs.json_nested_deeper_than(text.encode(), 2) is deeper_than_2


@pytest.mark.parametrize(
    ("topk", "fragment"),
    [(float("nan"), "whole number"), (1e400, "whole number"), (2.5, "whole number"), (True, "whole number"),
     (10**30, "between 1 and 1000"), ("3.0", "whole number"), ([3], "whole number")],
)
def test_topk_must_be_a_whole_number_in_range(topk, fragment):
    with pytest.raises(RequestError) as error:
        parse_request({"body": {"images": [b64(JPEG)], "topk": topk}}, LIMITS)
    assert error.value.status == 400 and fragment in error.value.message
    assert parse_request({"body": {"images": [b64(JPEG)], "topk": 3.0}}, LIMITS).topk == 3
    assert parse_request({"topk": bytearray(b"4"), "a": bytearray(JPEG)}, LIMITS).topk == 4


def triton_body(elements, binary, outputs=None, parameters=None):
    """An Open Inference Protocol body made by tritonclient, the protocol's reference client."""
    import numpy as np
    import tritonclient.http as triton

    tensor = triton.InferInput("images", [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs,
                                                                         parameters=parameters)
    return bytearray(body), None if json_size is None else str(json_size)


@pytest.mark.parametrize("send_length", [True, False])
def test_oip_binary_body_gives_raw_images_with_or_without_the_header_length(send_length):
    body, length = triton_body([JPEG, b"", b'{"x": 1}'], binary=True)
    parsed = parse_request({"body": body}, LIMITS, length if send_length else None)
    assert parsed.envelope == "kserve_v2"
    first, empty, third = parsed.payloads
    assert first == JPEG and third == b'{"x": 1}'
    assert isinstance(empty, ImageError) and empty.status == 400 and "empty" in empty.message
    assert parsed.outputs == (oip.RequestedOutput("predictions", True),)  # tritonclient's default: binary


def test_oip_text_body_arriving_as_str_is_read_like_bytes():
    body, length = triton_body([b64(JPEG)], binary=False, outputs=[])
    parsed = parse_request({"body": body.decode()}, LIMITS, length)
    assert parsed.payloads == [JPEG] and parsed.outputs == (oip.RequestedOutput("predictions", True),)


def test_oip_outputs_json_by_default_and_binary_when_asked():
    header = {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}]}
    assert parse_request({"body": header}, LIMITS).outputs == (oip.RequestedOutput("predictions", False),)
    asked = {**header, "parameters": {"binary_data_output": True, "topk": 2},
             "outputs": [{"name": "predictions", "parameters": {"binary_data": False}}]}
    parsed = parse_request({"body": asked}, LIMITS)
    assert parsed.outputs == (oip.RequestedOutput("predictions", False),) and parsed.topk == 2
    with pytest.raises(RequestError) as error:
        parse_request({"body": {**header, "outputs": [{"name": "logits"}]}}, LIMITS)
    assert error.value.status == 400
    assert "unknown output 'logits'; this model answers predictions" in error.value.message


@pytest.mark.parametrize(
    ("body", "length", "status", "fragment"),
    [
        (lambda: triton_body([JPEG] * 5, True)[0], None, 413, "the request has 5 elements"),
        (lambda: triton_body([JPEG, JPEG], True)[0][:-1], None, 400,
         "declare 50 bytes of binary data (binary_data_size) but 49 bytes"),
        (lambda: triton_body([JPEG], True)[0], "7", 400, "not valid JSON"),
        (lambda: triton_body([JPEG], True)[0], "100000", 400, "Inference-Header-Content-Length must be"),
        (lambda: bytearray(b'{"images": ["' + b64(JPEG).encode() + b'"]}' + b"\x00" * 99), None, 400,
         "99 bytes follow the JSON body; only an Open Inference Protocol request"),
        (lambda: triton_body([1.5], False)[0].replace(b'"1.5"', b"1.5").replace(b"BYTES", b"FP32"), None, 400,
         "datatype must be BYTES; got 'FP32'"),
    ],
)
def test_oip_bodies_that_do_not_add_up_are_rejected_with_a_reason(body, length, status, fragment):
    with pytest.raises(RequestError) as error:
        parse_request({"body": body()}, LIMITS, length)
    assert error.value.status == status
    assert fragment in error.value.message


def test_oip_binary_response_is_read_by_tritonclient():
    import tritonclient.http as triton

    entries = [{"topk": [{"index": 3}]}, {"error": {"status": 415, "message": "x"}}]
    parsed = ParsedRequest([], "kserve_v2", request_id="r2", outputs=(oip.RequestedOutput("predictions", True),))
    response = encode_response(parsed, entries, "m")
    assert isinstance(response.body, bytes) and response.content_type == "application/octet-stream"
    length = int(response.headers["Inference-Header-Content-Length"])
    result = triton.InferResult.from_response_body(response.body, header_length=length)
    assert [json.loads(item) for item in result.as_numpy("predictions")] == entries
    assert result.get_response()["id"] == "r2"


@pytest.mark.parametrize(("row", "kinds"), [
    ({"body": {"images": [b64(JPEG)]}}, {"topk"}),
    ({"body": {"images": [b64(JPEG)], "outputs": ["embedding"]}}, {"embedding"}),
    ({"body": {"images": [b64(JPEG)], "outputs": ["topk", "embedding"]}}, {"topk", "embedding"}),
    ({"body": {"instances": [{"data": b64(JPEG)}], "outputs": ["embedding"]}}, {"embedding"}),
    ({"a": bytearray(JPEG), "outputs": bytearray(b"embedding, topk")}, {"topk", "embedding"}),
    ({"a": bytearray(JPEG), "outputs": "embedding"}, {"embedding"}),
    ({"body": {"images": [b64(JPEG)], "outputs": "topk,embedding"}}, {"topk", "embedding"}),  # as in multipart
    ({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}],
               "outputs": [{"name": "embeddings"}]}}, {"embedding"}),
    ({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}],
               "outputs": [{"name": "predictions"}, {"name": "embeddings"}]}}, {"topk", "embedding"}),
    ({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}]}}, {"topk"}),
])
def test_a_request_chooses_its_outputs(row, kinds):
    parsed = parse_request(row, LIMITS)
    assert parsed.kinds == kinds
    assert parsed.payloads == [JPEG]


@pytest.mark.parametrize(("row", "fragment"), [
    ({"body": {"images": [b64(JPEG)], "outputs": ["labels"]}}, "'labels' is not one of them"),
    ({"body": {"images": [b64(JPEG)], "outputs": []}}, "outputs must name one or more of topk, embedding"),
    ({"body": {"images": [b64(JPEG)], "outputs": [3]}}, "outputs must name one or more"),
    ({"a": bytearray(JPEG), "outputs": bytearray(b"topk,,embedding")}, "'' is not one of them"),
    ({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}],
               "outputs": []}}, "\"outputs\" is empty"),
    ({"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}],
               "outputs": [{"name": "embedding"}]}}, "unknown output 'embedding'"),
])
def test_unknown_or_malformed_output_choices_are_refused(row, fragment):
    with pytest.raises(RequestError) as error:
        parse_request(row, LIMITS)
    assert error.value.status == 400 and fragment in error.value.message
