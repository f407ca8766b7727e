"""Transports through a real TorchServe (token auth on): tritonclient's JSON and binary modes of the Open
Inference Protocol, hostile binary bodies, and our client (library and command line) against multipart."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton

from image_batch_client.client import DEFAULT_MODEL, Client

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL  # the demo archive build_mar.py builds by default: change it in ts_client only
CLIENT = Path(sys.executable).parent / "image-batch-client"  # the console script of the client package
CORRUPT = b"\xff\xd8\xff\xe0 not really a JPEG after all"


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def photos(imagenet_photos, mixed_images):
    """Good photos of several formats with a corrupt one among them."""
    return [imagenet_photos[0], mixed_images["rgba.png"], CORRUPT, imagenet_photos[5], mixed_images["photo.webp"]]


@pytest.fixture(scope="module")
def multipart_entries(server, photos):
    """The reference answer: one plain multipart request, as README's curl sends it."""
    files = {f"image{i}": (f"p{i}", photo, "application/octet-stream") for i, photo in enumerate(photos)}
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", files=files, headers=server.headers(),
                             timeout=120)
    assert response.status_code == 200, response.text
    entries = response.json()
    assert [("error" in entry) for entry in entries] == [False, False, True, False, False]
    return entries


def assert_same_answers(entries, expected):
    assert len(entries) == len(expected)
    for entry, want in zip(entries, expected, strict=True):
        if "error" in want:
            assert entry == want
            continue
        assert [item["index"] for item in entry["topk"]] == [item["index"] for item in want["topk"]]
        assert [item["label"] for item in entry["topk"]] == [item["label"] for item in want["topk"]]
        for got, ref in zip(entry["topk"], want["topk"], strict=True):
            assert got["score"] == pytest.approx(ref["score"], abs=1e-4)


def triton_client(server):
    return triton.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)


def triton_input(photos, binary):
    items = photos if binary else [base64.b64encode(photo) for photo in photos]
    tensor = triton.InferInput("images", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return tensor


def entries_of(result):
    return [json.loads(item) for item in result.as_numpy("predictions")]


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)])
def test_tritonclient_json_and_binary_modes_answer_like_multipart(server, photos, multipart_entries, binary_in,
                                                                  binary_out):
    outputs = [triton.InferRequestedOutput("predictions", binary_data=binary_out)]
    result = triton_client(server).infer(MODEL, [triton_input(photos, binary_in)], outputs=outputs,
                                         headers=server.headers(), request_id="t-1")
    response = result.get_response()
    assert response["id"] == "t-1" and response["model_name"] == MODEL
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary_out
    assert_same_answers(entries_of(result), multipart_entries)
    assert entries_of(result)[2]["error"]["status"] == 400  # the corrupt image: its own entry, the same as multipart


def test_tritonclient_defaults_binary_everything_with_topk(server, photos, multipart_entries):
    """tritonclient's most common call: binary input, no outputs named (it then asks binary_data_output)."""
    result = triton_client(server).infer(MODEL, [triton_input(photos, True)], headers=server.headers(),
                                         parameters={"topk": 2})
    entries = entries_of(result)
    assert all(len(entry["topk"]) == 2 for i, entry in enumerate(entries) if i != 2)
    assert [e["topk"][0]["index"] for i, e in enumerate(entries) if i != 2] == \
           [e["topk"][0]["index"] for i, e in enumerate(multipart_entries) if i != 2]


def oip_binary_body(photos, size_delta=0):
    elements = b"".join(struct.pack("<I", len(photo)) + photo for photo in photos)
    header = json.dumps({"inputs": [{"name": "images", "shape": [len(photos)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(elements) + size_delta}}],
                         "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}]}).encode()
    return header, elements


@pytest.mark.parametrize("url_path", [f"/v2/models/{MODEL}/infer", f"/predictions/{MODEL}"])
@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json"])
def test_binary_response_headers_on_both_urls_and_content_types(server, photos, multipart_entries, url_path,
                                                                content_type):
    """TorchServe decodes an application/json body itself and forwards it raw when that fails: both work."""
    header, elements = oip_binary_body(photos)
    response = requests.post(server.inference_url + url_path, data=header + elements, timeout=120,
                             headers={**server.headers(), "Content-Type": content_type,
                                      "Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"] == "application/octet-stream"
    length = int(response.headers["Inference-Header-Content-Length"])
    result = triton.InferResult.from_response_body(response.content, header_length=length)
    assert_same_answers(entries_of(result), multipart_entries)


def hostile_oip_bodies(photo):
    header, elements = oip_binary_body([photo, photo])
    too_big, _ = oip_binary_body([photo, photo], size_delta=1000)
    mismatch = header.replace(b'"shape": [2]', b'"shape": [3]')
    runs_past = elements[:-10]
    return {
        "binary_data_size_beyond_the_body": (too_big + elements, len(too_big), "declare"),
        "shape_says_3_elements_data_holds_2": (mismatch + elements, len(mismatch), "holds 3 elements"),
        "element_runs_past_the_end": (header.replace(str(len(elements)).encode(), str(len(runs_past)).encode())
                                      + runs_past, None, "element 1 declares"),
        "header_length_lies": (header + elements, len(header) + 7, "not valid JSON"),
        "header_length_not_a_number": (header + elements, "lots", "Inference-Header-Content-Length must be"),
        "truncated_length_prefix": (mismatch.replace(str(len(elements)).encode(), str(len(elements) + 2).encode())
                                    + elements + b"\x01\x00", None, "inside the 4-byte length of element 2"),
    }


def test_hostile_binary_bodies_get_400_and_never_fail_the_batch_they_share(server, photos):
    url = f"{server.inference_url}/v2/models/{MODEL}/infer"
    good = photos[0]
    workers_before = server.worker_pids(MODEL)

    def send_hostile(body, length):
        headers = {**server.headers(), "Content-Type": "application/octet-stream"}
        if length is not None:
            headers["Inference-Header-Content-Length"] = str(length)
        return requests.post(url, data=body, headers=headers, timeout=120)

    def send_good():
        return requests.put(f"{server.inference_url}/predictions/{MODEL}", data=good, headers=server.headers(),
                            timeout=120)

    shared_counts = {}
    with ThreadPoolExecutor(6) as pool:
        for name, (body, length, fragment) in hostile_oip_bodies(good).items():
            for _ in range(6):  # rounds, until the hostile request shared a handler call with good ones
                logged = server.log_position()
                futures = [pool.submit(send_hostile, body, length), *(pool.submit(send_good) for _ in range(5))]
                hostile, *neighbours = [future.result() for future in futures]
                assert hostile.status_code == 400, (name, hostile.status_code, hostile.text[:300])
                assert fragment in hostile.json()["error"]["message"], (name, hostile.text[:300])
                assert all(r.status_code == 200 and "topk" in r.json()[0] for r in neighbours), name
                shared = call_holding(server, logged, hostile.headers["x-request-id"])
                if len(shared) >= 2:
                    break
            shared_counts[name] = len(shared)
    print(f"\nrequests in the handler call each hostile body shared: {shared_counts}")
    assert all(count >= 2 for count in shared_counts.values()), shared_counts
    assert server.worker_pids(MODEL) == workers_before


def call_holding(server, since, request_id, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ids in server.handler_calls(since):
            if request_id in ids:
                return ids
        time.sleep(0.1)
    raise AssertionError(f"no handler call with request {request_id} was logged within {timeout} s")


@pytest.mark.parametrize("transport", ["oip-binary", "oip-json", "json", "multipart", "raw", "grpc"])
def test_our_client_answers_like_multipart_in_every_transport(server, photos, multipart_entries, transport):
    with Client(server.inference_url, MODEL, server.keys["inference"], transport, max_images=2,
                grpc_address=server.grpc_inference_address) as client:
        assert len(client.plan([len(photo) for photo in photos])) == (5 if transport == "raw" else 3)
        entries = client.classify(photos)
    assert_same_answers(entries, multipart_entries)


def test_our_client_splits_a_big_batch_and_keeps_the_order(server, imagenet_photos):
    photos = imagenet_photos[:20]
    logged = server.log_position()
    with Client(server.inference_url, MODEL, server.keys["inference"], max_images=8) as client:
        requests_sent = len(client.plan([len(photo) for photo in photos]))
        entries = client.classify(photos)
        one_by_one = [client.classify([photo])[0] for photo in photos[:3]]
    assert requests_sent == 3  # 8 + 8 + 4 images
    assert_same_answers(entries[:3], one_by_one)
    assert all("topk" in entry for entry in entries)
    assert max(len(ids) for ids in server.handler_calls(logged)) >= 2  # TorchServe batched our requests again


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(CLIENT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_lone_corrupt_image_is_an_answer_from_another_directory(server, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(CORRUPT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli(bad, "--url", server.inference_url, "--model", MODEL, "--key-file",
                   server.workdir / "key_file.json", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.strip().startswith(f"{bad}: error 400:")
    # TorchServe's working directory has key_file.json: found there without --key-file
    found = run_cli(bad, "--url", server.inference_url, "--model", MODEL, cwd=server.workdir)
    assert found.returncode == 0 and "error 400" in found.stdout, found.stderr


def test_cli_jsonl_prints_one_object_per_image_in_order_and_nothing_else(server, corpus, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, path in enumerate(sorted((corpus / "imagenet").glob("*.jpg"))[:11]):
        (folder / f"{index:02d}.jpg").write_bytes(path.read_bytes())
    (folder / "01b.jpg").write_bytes(CORRUPT)
    (folder / "notes.txt").write_text("not an image: skipped when a folder is given")
    done = run_cli("--jsonl", folder, "--url", server.inference_url, "--model", MODEL, "--key-file",
                   server.workdir / "key_file.json", "--max-images", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = sorted(path for path in folder.iterdir() if path.suffix == ".jpg")
    assert [line["file"] for line in lines] == [str(path) for path in expected]
    assert [("error" in line) for line in lines] == [path.name == "01b.jpg" for path in expected]
    assert all(len(line["topk"]) == 5 for line in lines if "error" not in line)


def test_cli_refuses_a_wrong_key_and_an_unknown_model_clearly(server, corpus, tmp_path):
    photo = sorted((corpus / "imagenet").glob("*.jpg"))[0]
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
    wrong = run_cli(photo, "--url", server.inference_url, "--model", MODEL, "--key-file", key_file, cwd=tmp_path)
    assert wrong.returncode == 1 and "refused the inference key" in wrong.stderr and "Traceback" not in wrong.stderr
    unknown = run_cli(photo, "--url", server.inference_url, "--model", "no_such_model", "--key-file",
                      server.workdir / "key_file.json", cwd=tmp_path)
    assert unknown.returncode == 1 and "no_such_model" in unknown.stderr and "Traceback" not in unknown.stderr
