import base64
import json

import pytest

from handler import codecs
from handler.codecs import (
    ImageError,
    Limits,
    ParsedRequest,
    RequestError,
    encode_response,
    json_nested_deeper_than,
    parse_request,
)
from image_batch_client import oip

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
    assert isinstance(parsed.payloads[0], ImageError) and "got a JSON array" in parsed.payloads[0].message
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
    named_without_a_choice = {**header, "parameters": {"binary_data_output": True},
                              "outputs": [{"name": "predictions"}, {"name": "embeddings"}]}
    assert parse_request({"body": named_without_a_choice}, LIMITS).outputs == (
        oip.RequestedOutput("predictions", True), oip.RequestedOutput("embeddings", True))
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


V2_INPUT = {"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(JPEG)]}


@pytest.mark.parametrize("row", [None, "body", [("body", bytearray(JPEG))], bytearray(JPEG)])
def test_a_row_that_is_not_a_mapping_is_refused_with_400(row):
    with pytest.raises(RequestError) as error:
        parse_request(row, LIMITS)
    assert error.value.status == 400 and "could not be read" in error.value.message
    assert str(error.value) == error.value.message


def test_text_body_holding_json_is_parsed_like_a_json_body():
    parsed = parse_request({"body": json.dumps({"images": [b64(JPEG)], "topk": 2})}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.envelope == "plain" and parsed.topk == 2
    parsed = parse_request({"body": ' {"instances": [{"data": "' + b64(JPEG) + '"}]}'}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.envelope == "kserve_v1"


def test_text_body_that_is_not_valid_json_is_refused_with_400():
    with pytest.raises(RequestError) as error:
        parse_request({"body": '{"images": ["abc"'}, LIMITS)
    assert error.value.status == 400 and "not valid JSON" in error.value.message


def test_text_body_with_a_lone_surrogate_is_a_400_for_that_image_not_a_crash():
    parsed = parse_request({"body": '{"images": ["\ud800", "' + b64(JPEG) + '"]}'}, LIMITS)
    bad, good = parsed.payloads
    assert isinstance(bad, ImageError) and bad.status == 400 and good == JPEG


def test_json_bytes_body_that_is_not_utf8_is_refused_with_400():
    with pytest.raises(RequestError) as error:
        parse_request({"body": bytearray(b'{"images": ["\xff\xfe"]}')}, LIMITS)
    assert error.value.status == 400 and "not valid JSON" in error.value.message


@pytest.mark.parametrize("text", [b64(JPEG), "  " + b64(JPEG) + "\n", "data:image/jpeg;base64," + b64(JPEG)])
def test_text_body_that_is_not_json_is_one_base64_image(text):
    parsed = parse_request({"body": text}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.envelope == "plain"


def test_text_body_that_is_not_base64_is_a_400_for_its_one_image():
    parsed = parse_request({"body": "hello, world"}, LIMITS)
    (only,) = parsed.payloads
    assert isinstance(only, ImageError) and only.status == 400 and "image 0" in only.message


def test_json_bytes_body_with_leading_whitespace_is_still_json():
    body = bytearray(b' \r\n\t {"images": ["' + b64(JPEG).encode() + b'"]}')
    parsed = parse_request({"body": body}, LIMITS)
    assert parsed.payloads == [JPEG] and parsed.envelope == "plain"


def test_json_array_sent_as_bytes_is_refused_as_json_not_read_as_an_image():
    with pytest.raises(RequestError) as error:
        parse_request({"body": bytearray(b'["' + b64(JPEG).encode() + b'"]')}, LIMITS)
    assert error.value.status == 400 and "got a JSON array" in error.value.message


def test_json_body_may_end_in_whitespace_but_not_in_other_bytes():
    body = b'{"images": ["' + b64(JPEG).encode() + b'"]}'
    assert parse_request({"body": bytearray(body + b"\r\n")}, LIMITS).payloads == [JPEG]
    with pytest.raises(RequestError) as error:
        parse_request({"body": bytearray(body + b"x")}, LIMITS)
    assert error.value.status == 400 and "1 bytes follow the JSON body" in error.value.message


def test_instances_that_is_not_a_list_is_refused_with_400():
    with pytest.raises(RequestError) as error:
        parse_request({"body": {"instances": {"data": b64(JPEG)}}}, LIMITS)
    assert error.value.status == 400 and "\"instances\" must be a list" in error.value.message


def test_kserve_v1_instances_may_be_bare_strings_or_b64_objects():
    instances = [b64(JPEG), {"data": {"b64": b64(b"q")}}, {"b64": b64(b"r")}, {"data": b64(b"s"), "b64": "x"}]
    parsed = parse_request({"body": {"instances": instances}}, LIMITS)
    assert parsed.payloads == [JPEG, b"q", b"r", b"s"] and parsed.envelope == "kserve_v1"


def test_kserve_v1_instance_without_data_is_a_400_naming_its_index():
    parsed = parse_request({"body": {"instances": [b64(JPEG), {"image": b64(JPEG)}]}}, LIMITS)
    assert parsed.payloads[0] == JPEG
    missing = parsed.payloads[1]
    assert isinstance(missing, ImageError) and missing.status == 400
    assert "instance 1" in missing.message and "\"data\"" in missing.message


def test_kserve_v1_topk_in_the_body_is_kept():
    parsed = parse_request({"body": {"instances": [{"data": b64(JPEG)}], "topk": 2}}, LIMITS)
    assert parsed.topk == 2 and parsed.envelope == "kserve_v1"


def test_kserve_v2_topk_at_top_level_is_kept_and_parameters_topk_wins():
    assert parse_request({"body": {"inputs": [V2_INPUT], "topk": 3}}, LIMITS).topk == 3
    both = {"inputs": [V2_INPUT], "topk": 3, "parameters": {"topk": 5}}
    assert parse_request({"body": both}, LIMITS).topk == 5
    with pytest.raises(RequestError) as error:
        parse_request({"body": {"inputs": [V2_INPUT], "parameters": {"topk": 0}}}, LIMITS)
    assert error.value.status == 400 and "topk must be between 1 and 1000" in error.value.message


def test_row_topk_field_with_a_kserve_body_keeps_the_envelope_and_id():
    row = {"body": {"id": "r9", "inputs": [V2_INPUT]}, "topk": bytearray(b"2")}
    parsed = parse_request(row, LIMITS)
    assert parsed.topk == 2 and parsed.envelope == "kserve_v2" and parsed.request_id == "r9"
    assert parsed.outputs == (oip.RequestedOutput("predictions", False),) and parsed.payloads == [JPEG]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "\"inputs\" must be a non-empty list"),
        ({"inputs": V2_INPUT}, "\"inputs\" must be a non-empty list"),
        ({"inputs": [{k: v for k, v in V2_INPUT.items() if k != "data"}]}, "'i' has no data"),
        ({"inputs": [{k: v for k, v in V2_INPUT.items() if k != "datatype"}]}, "datatype must be BYTES; got None"),
        ({"inputs": [{**V2_INPUT, "data": b64(JPEG)}]}, "\"data\" must be a list"),
        ({"id": 7, "inputs": [V2_INPUT]}, "\"id\" must be a string"),
        ({"inputs": [{**V2_INPUT, "shape": [0], "data": []}]}, "contains no image"),
    ],
)
def test_kserve_v2_bodies_with_malformed_inputs_are_refused_with_400(body, fragment):
    with pytest.raises(RequestError) as error:
        parse_request({"body": body}, LIMITS)
    assert error.value.status == 400
    assert fragment in error.value.message


def test_b64_objects_are_accepted_as_items_of_images_and_kserve_v2_data():
    parsed = parse_request({"body": {"images": [{"b64": b64(JPEG)}, b64(b"q")]}}, LIMITS)
    assert parsed.payloads == [JPEG, b"q"]
    v2 = {"inputs": [{**V2_INPUT, "shape": [2], "data": [{"b64": b64(JPEG)}, b64(b"q")]}]}
    assert parse_request({"body": v2}, LIMITS).payloads == [JPEG, b"q"]


@pytest.mark.parametrize("item, kind", [(7, "number"), (2.5, "number"), (None, "null"), (True, "boolean"),
                                        (["abc"], "array"), ({"data": "abc"}, "object"), ({"b64": 5}, "")])
def test_an_item_that_is_not_a_string_is_a_400_naming_its_index_and_its_json_kind(item, kind):
    parsed = parse_request({"body": {"images": [b64(JPEG), item]}}, LIMITS)
    assert parsed.payloads[0] == JPEG
    bad = parsed.payloads[1]
    assert isinstance(bad, ImageError) and bad.status == 400
    assert "image 1 must be a base64 string" in bad.message
    assert bad.message.endswith(f"got a JSON {kind}") or not kind, bad.message


def test_request_envelope_is_plain_for_multipart_and_images_bodies():
    assert parse_request({"a": bytearray(JPEG), "b": b64(JPEG)}, LIMITS).envelope == "plain"
    assert parse_request({"body": {"images": [b64(JPEG)]}}, LIMITS).envelope == "plain"
    assert parse_request({"data": bytearray(JPEG)}, LIMITS).envelope == "plain"


def test_a_single_multipart_field_not_named_body_is_an_image_field():
    parsed = parse_request({"file": bytearray(b'{"images": []}')}, LIMITS)
    assert parsed.payloads == [b'{"images": []}'] and parsed.envelope == "plain"
    parsed = parse_request({"file": bytearray()}, LIMITS)  # a per-image error, not a whole-request one
    (empty,) = parsed.payloads
    assert isinstance(empty, ImageError) and empty.status == 400 and "'file'" in empty.message


def test_several_fields_are_all_images_even_when_the_first_is_named_data():
    parsed = parse_request({"data": bytearray(JPEG), "x": bytearray(b"2")}, LIMITS)
    assert parsed.payloads == [JPEG, b"2"]


def test_an_empty_multipart_field_is_a_400_for_that_field_only():
    parsed = parse_request({"a": bytearray(JPEG), "b": bytearray(), "c": b""}, LIMITS)
    first, empty, empty_bytes = parsed.payloads
    assert first == JPEG
    for error, name in ((empty, "'b'"), (empty_bytes, "'c'")):
        assert isinstance(error, ImageError) and error.status == 400
        assert name in error.message and "empty" in error.message


@pytest.mark.parametrize("value", [{"images": []}, [1, 2], 5, None])
def test_a_multipart_field_that_is_neither_bytes_nor_text_is_a_400_for_that_field(value):
    parsed = parse_request({"a": bytearray(JPEG), "b": value}, LIMITS)
    assert parsed.payloads[0] == JPEG
    bad = parsed.payloads[1]
    assert isinstance(bad, ImageError) and bad.status == 400 and "'b'" in bad.message


def test_raw_image_of_exactly_the_byte_limit_is_accepted_and_one_more_is_413():
    exact, over = b"x" * 1000, b"y" * 1001
    parsed = parse_request({"a": bytearray(exact), "b": bytearray(over)}, LIMITS)
    assert parsed.payloads[0] == exact
    assert isinstance(parsed.payloads[1], ImageError) and parsed.payloads[1].status == 413
    assert "1001 bytes" in parsed.payloads[1].message and "1000" in parsed.payloads[1].message
    assert parse_request({"body": bytearray(exact)}, LIMITS).payloads == [exact]
    (refused,) = parse_request({"body": bytearray(over)}, LIMITS).payloads
    assert isinstance(refused, ImageError) and refused.status == 413


def test_base64_image_of_exactly_the_byte_limit_is_accepted_and_one_more_is_413():
    exact, over = b"x" * 1000, b"y" * 1001
    parsed = parse_request({"body": {"images": [b64(exact), "data:image/png;base64," + b64(exact), b64(over)]}},
                           LIMITS)
    assert parsed.payloads[:2] == [exact, exact]
    assert isinstance(parsed.payloads[2], ImageError) and parsed.payloads[2].status == 413


@pytest.mark.parametrize("length", [1338, 5000])
def test_oversized_base64_is_refused_by_its_length_before_decoding(length):
    # Not base64 at all: decoding it would give 400, so 413 proves the size was checked first.
    # 1338 characters could hold at most 1003 bytes, one more than 1000 bytes plus two padding bytes.
    parsed = parse_request({"body": {"images": ["!" * length]}}, LIMITS)
    (refused,) = parsed.payloads
    assert isinstance(refused, ImageError) and refused.status == 413
    assert "image 0" in refused.message and "1000 bytes" in refused.message


@pytest.mark.parametrize("text", [
    "data:image/png," + b64(JPEG),  # a data URI that is not base64
    "data:xx" + b64(JPEG),  # no marker at all
    "image/png;base64," + b64(JPEG),  # the marker without "data:"
    "data:image/png;" + "x" * 100 + ";base64," + b64(JPEG),  # marker past the first 100 characters
])
def test_only_a_data_uri_with_base64_marker_near_its_start_is_unwrapped(text):
    (payload,) = parse_request({"body": {"images": [text]}}, LIMITS).payloads
    assert isinstance(payload, ImageError) and payload.status == 400 and "not valid base64" in payload.message


@pytest.mark.parametrize("field", ["topk", "outputs"])
def test_option_fields_with_non_utf8_bytes_are_refused_with_400(field):
    with pytest.raises(RequestError) as error:
        parse_request({"a": bytearray(JPEG), field: bytearray(b"\xff\xfe")}, LIMITS)
    assert error.value.status == 400 and field in error.value.message


def test_topk_range_is_inclusive_of_one_and_the_limit():
    limits = Limits(max_images=4, max_image_bytes=1000, max_topk=5)
    for topk in (1, 5):
        assert parse_request({"body": {"images": [b64(JPEG)], "topk": topk}}, limits).topk == topk
        assert parse_request({"a": bytearray(JPEG), "topk": bytearray(str(topk).encode())}, limits).topk == topk
    for topk in (0, 6, -1):
        with pytest.raises(RequestError) as error:
            parse_request({"body": {"images": [b64(JPEG)], "topk": topk}}, limits)
        assert error.value.status == 400 and "between 1 and 5" in error.value.message


@pytest.mark.parametrize("shape", ["images", "instances", "inputs", "multipart"])
def test_exactly_max_images_is_accepted_and_one_more_is_413(shape):
    def row(count):
        if shape == "multipart":
            return {f"f{i}": bytearray(JPEG) for i in range(count)}
        if shape == "inputs":
            return {"body": {"inputs": [{**V2_INPUT, "shape": [count], "data": [b64(JPEG)] * count}]}}
        return {"body": {shape: [b64(JPEG)] * count}}

    assert parse_request(row(4), LIMITS).payloads == [JPEG] * 4
    with pytest.raises(RequestError) as error:
        parse_request(row(5), LIMITS)
    assert error.value.status == 413


def test_kserve_v2_response_names_its_output_and_datatype_and_passes_other_tensors_through():
    entries = [{"topk": []}]
    embeddings = oip.Tensor("embeddings", "FP32", (1, 2), [0.5, -1.0])
    outputs = (oip.RequestedOutput("embeddings", False), oip.RequestedOutput("predictions", False))
    parsed = ParsedRequest([], "kserve_v2", outputs=outputs)
    body = json.loads(encode_response(parsed, entries, "m", {"embeddings": embeddings}).body)
    assert "id" not in body
    assert body["outputs"] == [
        {"name": "embeddings", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -1.0]},
        {"name": "predictions", "datatype": "BYTES", "shape": [1], "data": ['{"topk": []}']},
    ]


@pytest.mark.parametrize("topk", ["x" * 1000, "9" * 1000, 10**1000])
def test_a_long_value_is_shortened_in_its_error_message(topk):
    """Error messages echo a client's value in at most 40 characters and an ellipsis, never the whole of it."""
    with pytest.raises(RequestError) as error:
        parse_request({"body": {"images": [b64(JPEG)], "topk": topk}}, LIMITS)
    assert error.value.status == 400
    echoed = error.value.message.rpartition("got ")[2]
    assert len(echoed) == 43 and echoed.endswith("...") and echoed[:40] in ascii(topk), error.value.message


def test_a_shallow_body_with_many_brackets_is_not_too_deep():
    """Only nesting counts against the depth limit, not how many objects and arrays a body holds."""
    assert not json_nested_deeper_than(b"[" + b"[{}]," * 200 + b"[]]", 32)
    assert json_nested_deeper_than(b"[" * 33 + b"]" * 33, 32)
    assert not json_nested_deeper_than(b"[" * 32 + b"]" * 32, 32)
    items = [{"b64": b64(JPEG)} for _ in range(40)]
    limits = Limits(max_images=40, max_image_bytes=LIMITS.max_image_bytes, max_topk=LIMITS.max_topk)
    assert parse_request({"body": json.dumps({"images": items}).encode()}, limits).payloads == [JPEG] * 40
