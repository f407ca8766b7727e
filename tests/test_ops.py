"""Operations against a real TorchServe: hostile input, limits, metrics, KServe URLs, scaling under load, faults.

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import yaml
from conftest import DEMO_MODEL_NAME, REPO, keep_logs_if_failed

from tests.harness.hostile import awkward_but_valid, json_hostile, raw_hostile
from tests.harness.traffic import Traffic, scale_out_and_back
from tests.harness.ts_server import TorchServe

pytestmark = pytest.mark.e2e
MODEL = DEMO_MODEL_NAME
MAX_IMAGE_BYTES = 3_000_000
MAX_REQUEST_BYTES = 30_000_000
OPS_MODEL_CONFIG = {
    "minWorkers": 1,
    "maxWorkers": 3,
    "batchSize": 8,
    "maxBatchDelay": 100,
    "responseTimeout": 120,
    "handler": {"max_image_bytes": MAX_IMAGE_BYTES, "max_images_per_request": 40, "max_batch": 16},
}


@pytest.fixture(scope="module")
def ops_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ops")
    config = folder / "model-config.yaml"
    config.write_text(yaml.safe_dump(OPS_MODEL_CONFIG))
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--config", str(config),
                    "--export-path", str(folder)], check=True, capture_output=True)
    return folder


def started_server(store, request):
    server = TorchServe(store, [f"{MODEL}.mar"], extra_config={"max_request_size": str(MAX_REQUEST_BYTES)})
    server.start()
    yield server
    server.stop()
    keep_logs_if_failed(server, request)


@pytest.fixture(scope="module")
def server(ops_store, request):
    """Shared by the tests that leave its state as they found it."""
    yield from started_server(ops_store, request)


@pytest.fixture(scope="module")
def fault_server(ops_store, request):
    """Its own server for the tests that kill a worker or rotate a key, so no other test meets that state."""
    yield from started_server(ops_store, request)


def top5(entry):
    return [item["index"] for item in entry["topk"]]


def predict(server, timeout=120, content_type=None, **kwargs):
    headers = server.headers() | ({"Content-Type": content_type} if content_type else {})
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=headers, timeout=timeout, **kwargs)


def test_hostile_inputs_inside_batches_get_their_own_errors(server, imagenet_photos):
    workers_before = server.worker_pids(MODEL)
    good = imagenet_photos[:3]
    alone = [top5(predict(server, files={"a": photo}).json()[0]) for photo in good]
    hostile = raw_hostile(good[0], MAX_IMAGE_BYTES)
    valid = awkward_but_valid(good[1])
    files, expected = [], []
    for index, (name, (payload, status)) in enumerate(hostile.items()):
        if index % 2 == 0:
            files.append((f"good{index}", good[index % 3]))
            expected.append(alone[index % 3])
        files.append((name, payload))
        expected.append(status)
    for name, payload in valid.items():
        files.append((name, payload))
        expected.append(200)
    for start in range(0, len(files), 36):  # the ops archive allows 40 images per request
        part, wanted = files[start: start + 36], expected[start: start + 36]
        response = predict(server, files=[(name, (name, data)) for name, data in part])
        assert response.status_code == 200, response.text[:500]
        entries = response.json()
        assert len(entries) == len(part)
        for (name, _), want, entry in zip(part, wanted, entries, strict=True):
            if isinstance(want, list):
                assert top5(entry) == want, (name, entry)  # the good photo's own answer, undisturbed
            elif want == 200:
                assert "topk" in entry, (name, entry)
            else:
                assert "error" in entry and entry["error"]["status"] == want, (name, entry)
                assert len(entry["error"]["message"]) > 10, (name, entry)

    items = json_hostile()
    good_b64 = base64.b64encode(good[2]).decode()
    body = {"images": [good_b64, *(item for item, _ in items.values()), good_b64]}
    response = predict(server, json=body)
    entries = response.json()
    assert response.status_code == 200 and len(entries) == len(items) + 2
    assert "topk" in entries[0] and "topk" in entries[-1]
    for (name, (_, status)), entry in zip(items.items(), entries[1:-1], strict=True):
        assert entry["error"]["status"] == status, (name, entry)

    print(f"\nkinds of bad input tried: {len(hostile) + len(items)} "
          f"(plus {len(valid)} awkward-but-valid images)")
    assert len(hostile) + len(items) >= 20
    assert server.worker_pids(MODEL) == workers_before  # the worker never restarted


def test_request_level_limits(server, imagenet_photos):
    too_many = {f"image{i}": imagenet_photos[0] for i in range(41)}
    response = predict(server, files=too_many)
    assert response.status_code == 413 and "limit is 40 per request" in response.json()["error"]["message"]
    oversized = predict(server, data=b"\xff\xd8" + b"\x00" * (MAX_REQUEST_BYTES + 1000), content_type="image/jpeg")
    assert oversized.status_code == 413  # refused by TorchServe's frontend (max_request_size)
    assert predict(server, files={"a": imagenet_photos[0]}).status_code == 200


def metric_value(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus metric's samples (optionally only those whose labels contain ``label``)."""
    return sum(float(value) for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
               if label in labels)


def test_metrics_are_scraped_in_prometheus_format_with_the_right_counts(server, imagenet_photos):
    scrape = lambda: requests.get(f"{server.metrics_url}/metrics", timeout=10).text  # noqa: E731 (no token there)
    before = scrape()
    counts = lambda text: (metric_value(text, "ImagesProcessed"),  # noqa: E731
                           metric_value(text, "ImagesRejected", 'Status="415"'))
    processed, rejected = counts(before)
    response = predict(server, files={"a": imagenet_photos[0], "b": b"not an image", "c": imagenet_photos[1]})
    assert response.status_code == 200
    deadline = time.monotonic() + 30
    text = before
    while time.monotonic() < deadline and counts(text) == (processed, rejected):
        time.sleep(0.5)
        text = scrape()
    for name in ("ImagesProcessed", "ImagesRejected", "InferenceTime", "DecodeWaitTime", "BatchHandleTime",
                 "RequestsPerBatch", "ImagesPerRequest", "ts_inference_requests_total"):
        assert name in text, name
    assert counts(text) == (processed + 2, rejected + 1)  # classified, and refused (415)


def test_kserve_v1_and_v2_urls_keep_batching(server, imagenet_photos):
    photos = [base64.b64encode(p).decode() for p in imagenet_photos[:4]]
    plain = predict(server, files={f"i{n}": p for n, p in enumerate(imagenet_photos[:4])}).json()
    expected = [top5(entry) for entry in plain]
    v1_url = f"{server.inference_url}/v1/models/{MODEL}:predict"
    v2_url = f"{server.inference_url}/v2/models/{MODEL}/infer"
    already_logged = server.log_position()

    def call(index):
        if index % 2:
            body = {"instances": [{"data": photos[index % 4]}, {"b64": photos[(index + 1) % 4]}]}
            return "v1", index, requests.post(v1_url, json=body, headers=server.headers(), timeout=120)
        body = {"id": f"req-{index}", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                                  "data": [photos[index % 4], photos[(index + 1) % 4]]}]}
        return "v2", index, requests.post(v2_url, json=body, headers=server.headers(), timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(16)))
    for protocol, index, response in answers:
        assert response.status_code == 200, response.text[:300]
        body = response.json()
        if protocol == "v1":
            entries = body["predictions"]
        else:
            assert body["id"] == f"req-{index}"
            entries = [json.loads(item) for item in body["outputs"][0]["data"]]
        assert [top5(e) for e in entries] == [expected[index % 4], expected[(index + 1) % 4]]

    calls = calls_holding(server, already_logged, [response.headers["x-request-id"] for *_, response in answers])
    print(f"\nrequests per handler call for 16 concurrent KServe requests: {[len(ids) for ids in calls]}")
    assert max(len(ids) for ids in calls) > 1  # TorchServe batched several KServe requests into one handler call


def hostile_bodies(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """Whole request bodies that must cost only their own request: name -> (body, Content-Type)."""
    good = base64.b64encode(photo).decode()
    as_json = lambda value: json.dumps(value).encode()  # noqa: E731
    deep = b"[" * 100_000 + b"]" * 100_000
    return {
        "array_nested_100k_deep": (deep, "application/json"),
        "images_holding_a_deep_array": (b'{"images": ' + deep + b"}", "application/json"),
        "object_chain_100k_deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json"),
        "deep_array_as_text": (deep, "text/plain"),
        "topk_nan": (b'{"images": ["' + good.encode() + b'"], "topk": NaN}', "application/json"),
        "topk_huge": (as_json({"images": [good], "topk": 10**30}), "application/json"),
        "topk_float": (as_json({"images": [good], "topk": 2.5}), "application/json"),
        "lone_surrogate": (b'{"images": ["\\ud800\\udfff\\ud800"]}', "application/json"),
        "kserve_v2_nested_data": (as_json({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                                       "data": [[[good]]]}]}), "application/json"),
        "kserve_v1_instances_not_a_list": (as_json({"instances": good}), "application/json"),
        "list_of_null": (as_json({"images": [None]}), "application/json"),
        "bytes_posing_as_an_oip_body": (b'{"inputs": [' + bytes(range(256)) * 8, "application/json"),
    }


def test_no_request_can_fail_the_others_in_its_batch(server, imagenet_photos):
    """Each hostile body sent together with five good requests, until TorchServe batches it with good ones."""
    workers_before = server.worker_pids(MODEL)
    url = f"{server.inference_url}/predictions/{MODEL}"
    good = imagenet_photos[0]

    def send(body, content_type):
        headers = server.headers() | {"Content-Type": content_type}
        return requests.post(url, data=body, headers=headers, timeout=120)

    outcomes = {}
    with ThreadPoolExecutor(6) as pool:
        for name, (body, content_type) in hostile_bodies(good).items():
            for _ in range(6):  # rounds, until the hostile request shared a handler call with good ones
                logged = server.log_position()
                futures = [pool.submit(send, body, content_type),
                           *(pool.submit(send, good, "image/jpeg") for _ in range(5))]
                hostile, *neighbours = [future.result() for future in futures]
                assert hostile.status_code in (400, 413, 415), (name, hostile.status_code, hostile.text[:300])
                assert len(hostile.json()["error"]["message"]) > 10, name
                assert all(r.status_code == 200 and "topk" in r.json()[0] for r in neighbours), name
                [shared] = calls_holding(server, logged, [hostile.headers["x-request-id"]])
                if len(shared) >= 2:
                    break
            outcomes[name] = (hostile.status_code, hostile.json()["error"]["message"][:70], len(shared))
            assert len(shared) >= 2, f"{name} never shared a handler call with a good request"
    print("\nhostile body: status, message, requests in the handler call it shared with good requests")
    for name, (status, message, shared) in outcomes.items():
        print(f"  {name}: {status} {message!r} {shared}")
    assert server.worker_pids(MODEL) == workers_before


def calls_holding(server, since: int, request_ids: list[str], timeout: float = 10) -> list[tuple[str, ...]]:
    """The handler calls (their request ids) that held ``request_ids``, once every one of them was logged."""
    deadline = time.monotonic() + timeout
    while True:
        calls = [ids for ids in server.handler_calls(since) if set(ids) & set(request_ids)]
        if {i for ids in calls for i in ids} >= set(request_ids):
            return calls
        if time.monotonic() > deadline:
            raise AssertionError(f"the handler calls of {len(request_ids)} requests were not logged within {timeout} s")
        time.sleep(0.1)


def multipart_traffic(server, photos, clients):
    """A lost request (see TorchServe issue #1101 below) hangs its client until this timeout."""
    files = {f"image{i}": photo for i, photo in enumerate(photos)}
    return Traffic(lambda: predict(server, timeout=60, files=files).status_code, clients)


def rss(pids):
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid)}


def test_load_while_scaling_1_to_2_to_1(server, imagenet_photos):
    photos = imagenet_photos[:4]
    for _ in range(6):  # steady state before measuring memory
        assert predict(server, files={f"i{n}": p for n, p in enumerate(photos)}).status_code == 200
    start_rss = rss(server.worker_pids(MODEL))
    with multipart_traffic(server, photos, clients=3) as traffic:
        scale_down_window = scale_out_and_back(server, MODEL, workers=2, hold_s=8, traffic=traffic)
    end_rss = rss(server.worker_pids(MODEL))
    outcomes, failures = traffic.outcomes, traffic.failures
    lost_at_scale_down = traffic.failures_in_flight_during(*scale_down_window)
    survivors = set(start_rss) & set(end_rss)
    growth = max((end_rss[p] / start_rss[p] - 1 for p in survivors), default=None)
    if growth is None:  # the original worker was the one stopped: compare the survivor with it
        growth = max(end_rss.values()) / max(start_rss.values()) - 1
    print(f"\nrequests under scaling 1->2->1: {len(outcomes)}, failed: {len(failures)} "
          f"(in flight on a worker TorchServe stopped: {len(lost_at_scale_down)}), "
          f"worker RSS growth: {growth:+.1%} ({max(start_rss.values()) / 2**20:.0f} MiB at start)")
    assert len(outcomes) >= 10
    assert failures == lost_at_scale_down  # nothing fails during scale-up or steady serving
    assert len(lost_at_scale_down) <= 3  # at most the one request in flight per client
    assert growth <= 0.10


def test_killed_worker_is_restarted_and_later_requests_succeed(fault_server, imagenet_photos):
    server = fault_server
    photos = imagenet_photos[:2]
    victim = server.worker_pids(MODEL)[0]
    with multipart_traffic(server, photos, clients=2) as traffic:
        traffic.wait_for_outcomes(2)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovered_at = None
        deadline = killed_at + 180
        while time.monotonic() < deadline:
            pids = server.worker_pids(MODEL)
            if server.ready_workers(MODEL) >= 1 and victim not in pids:
                recovered_at = time.monotonic()
                break
            time.sleep(0.2)
        assert recovered_at is not None, "TorchServe did not restart the killed worker"
        deadline = time.monotonic() + 150  # clients stuck on the killed worker wait for their timeout
        while time.monotonic() < deadline and sum(o[0] > recovered_at for o in traffic.outcomes) < 3:
            time.sleep(0.5)
    outcomes = traffic.outcomes
    in_flight_failures = [o for o in outcomes if o[2] != 200 and o[0] <= killed_at]
    later_failures = [o for o in outcomes if o[2] != 200 and o[0] > killed_at]
    after_recovery = [o for o in outcomes if o[0] > recovered_at]
    print(f"\nworker killed: recovery in {recovered_at - killed_at:.1f} s; requests {len(outcomes)}, "
          f"failed in flight {len(in_flight_failures)}, failed later {len(later_failures)}, "
          f"after recovery {len(after_recovery)} (all 200)")
    assert len(in_flight_failures) <= 2  # at most one request in flight per client
    assert later_failures == []
    assert after_recovery and all(code == 200 for _, _, code in after_recovery)


def test_rotating_the_inference_key_revokes_the_old_one(fault_server, imagenet_photos):
    server = fault_server
    old_key = server.keys["inference"]
    response = requests.post(f"{server.management_url}/token", params={"type": "inference"},
                             headers=server.headers("API"), timeout=30)
    assert response.status_code == 200, response.text
    new_key = json.loads((server.workdir / "key_file.json").read_text())["inference"]["key"]
    assert new_key != old_key
    server.keys["inference"] = new_key
    url = f"{server.inference_url}/predictions/{MODEL}"
    assert requests.put(url, data=imagenet_photos[0], headers={"Authorization": f"Bearer {old_key}"},
                        timeout=60).status_code in (400, 401)
    assert requests.put(url, data=imagenet_photos[0], headers=server.headers(), timeout=60).status_code == 200
    # the management key cannot mint keys: only the API key can
    refused = requests.post(f"{server.management_url}/token", params={"type": "inference"},
                            headers=server.headers("management"), timeout=30)
    assert refused.status_code in (400, 401)
