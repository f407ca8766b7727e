"""End to end: build the .mar, start a real TorchServe on free loopback ports with token auth, talk HTTP."""

import base64
import socket
import time
import zipfile

import psutil
import pytest
import requests
import torch
import yaml
from conftest import DEMO_MODEL_NAME

from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.model import load_model
from image_batch_client.client import classify, classify_one_per_request
from tests.harness.reference import reference_probabilities, timm_transform
from tests.harness.traffic import Traffic, scale_out_and_back
from tests.harness.ts_server import TorchServe

pytestmark = pytest.mark.e2e
MODEL = DEMO_MODEL_NAME
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def model_store(demo_store):
    return demo_store


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def in_process_engine(model_store, tmp_path_factory):
    """Our engine in this process, with the weights and settings packed in the served archive."""
    folder = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as archive:
        archive.extractall(folder)
    config = HandlerConfig.from_model_yaml(yaml.safe_load((folder / "model-config.yaml").read_text()))
    engine = InferenceEngine(config, load_model(config, folder / f"{MODEL}.pt", torch.device("cpu")),
                             torch.device("cpu"))
    yield engine
    engine.close()


def indices(entry):
    return [item["index"] for item in entry["topk"]]


def assert_matches_engine(entries, expected, tolerance=2e-3):
    """Served top-k against the in-process engine's: the same score at every rank; two classes may change places
    only where their scores tie within the tolerance (the server's model step is exact to ~1e-5, not bit-equal)."""
    assert len(entries) == len(expected)
    for entry, want in zip(entries, expected, strict=True):
        assert len(entry["topk"]) == len(want)
        want_scores = dict(want)
        for rank, item in enumerate(entry["topk"]):
            assert item["score"] == pytest.approx(want[rank][1], abs=tolerance)
            if item["index"] != want[rank][0]:
                assert abs(want_scores.get(item["index"], want[-1][1]) - want[rank][1]) <= tolerance, (entry, want)


def assert_same_top5_as(entries, probabilities, tolerance=2e-3):
    """Served top-5 against a reference's probabilities: at every rank, the served class has the reference's
    probability of that rank (a near-tie may swap two classes, nothing else may)."""
    for entry, row in zip(entries, probabilities, strict=True):
        best = row.topk(5).values.tolist()
        assert [row[index].item() for index in indices(entry)] == pytest.approx(best, abs=tolerance)


def test_raw_body_put_and_post(server, imagenet_photos, in_process_engine):
    url = f"{server.inference_url}/predictions/{MODEL}"
    expected = in_process_engine.predict([imagenet_photos[0]])
    put = requests.put(url, data=imagenet_photos[0], headers=server.headers(), timeout=60)
    post = requests.post(url, data=imagenet_photos[0], timeout=60,
                         headers={**server.headers(), "Content-Type": "image/jpeg"})
    for response in (put, post):
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body) == 1 and len(body[0]["topk"]) == 5
        assert_matches_engine(body, expected)
        assert {"label", "index", "score"} == set(body[0]["topk"][0])


def test_the_trained_demo_knows_a_cat_and_an_espresso_in_every_request_format(server, samples):
    """Raw, multipart and JSON requests for scikit-image's cat and coffee photos: real labels, same answers."""
    url = f"{server.inference_url}/predictions/{MODEL}"
    cat, coffee = samples["cat.jpg"], samples["coffee.jpg"]
    raw = [requests.put(url, data=photo, headers=server.headers(), timeout=60).json()[0] for photo in (cat, coffee)]
    multipart = requests.post(url, files={"a": cat, "b": coffee}, headers=server.headers(), timeout=60).json()
    as_json = requests.post(url, json={"images": [base64.b64encode(p).decode() for p in (cat, coffee)]},
                            headers=server.headers(), timeout=60).json()
    for entries in (raw, multipart, as_json):
        cat_top5, coffee_top5 = (set(indices(entry)) for entry in entries)
        assert cat_top5 & CAT_CLASSES, entries[0]
        assert coffee_top5 & COFFEE_CLASSES, entries[1]
        assert entries[1]["topk"][0]["label"] == "espresso" and entries[1]["topk"][0]["score"] > 0.9
        assert [indices(entry) for entry in entries] == [indices(entry) for entry in raw]


def test_multipart_with_32_photos_returns_32_entries_in_order(server, imagenet_photos, in_process_engine,
                                                              demo_model):
    photos = imagenet_photos[:32]
    files = {f"image{i:02d}": (f"p{i}.jpg", photo, "image/jpeg") for i, photo in enumerate(photos)}
    started = time.perf_counter()
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", files=files,
                             headers=server.headers(), timeout=300)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    entries = response.json()
    print(f"\n32-photo multipart request: {elapsed * 1e3:.0f} ms")
    assert_matches_engine(entries, in_process_engine.predict(photos))
    reference = reference_probabilities(demo_model, photos, timm_transform(demo_model))  # timm's model, our weights
    assert_same_top5_as(entries, reference)  # timm's pipeline


def test_json_request_with_a_bad_image_keeps_the_good_ones(server, imagenet_photos, in_process_engine):
    images = [base64.b64encode(p).decode() for p in imagenet_photos[:2]]
    body = {"images": [images[0], "definitely not base64!", images[1]], "topk": 3}
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body,
                             headers=server.headers(), timeout=60)
    assert response.status_code == 200, response.text
    good0, bad, good1 = response.json()
    assert bad["error"]["status"] == 400 and "base64" in bad["error"]["message"]
    expected = in_process_engine.predict(imagenet_photos[:2], topk=3)
    assert_matches_engine([good0, good1], expected)


def test_malformed_and_undecodable_requests_get_4xx(server, mixed_images):
    url = f"{server.inference_url}/predictions/{MODEL}"
    broken = requests.post(url, data=b'{"images": [', timeout=60,
                           headers={**server.headers(), "Content-Type": "application/json"})
    assert broken.status_code == 400
    svg = requests.put(url, data=b"<svg xmlns='http://www.w3.org/2000/svg'/>", headers=server.headers(), timeout=60)
    assert svg.status_code == 415 and "unsupported" in svg.json()["error"]["message"]
    fine = requests.post(url, files={"a": mixed_images["rgba.png"], "b": mixed_images["grey16.png"]},
                         headers=server.headers(), timeout=60)
    assert fine.status_code == 200 and all("topk" in entry for entry in fine.json())


def test_requests_without_a_valid_token_are_refused(server, imagenet_photos):
    url = f"{server.inference_url}/predictions/{MODEL}"
    assert requests.put(url, data=imagenet_photos[0], timeout=30).status_code in (400, 401)
    wrong = {"Authorization": "Bearer not-the-key"}
    assert requests.put(url, data=imagenet_photos[0], headers=wrong, timeout=30).status_code in (400, 401)
    assert requests.get(f"{server.inference_url}/ping", timeout=30).status_code in (400, 401)
    management = f"{server.management_url}/models/{MODEL}"
    assert requests.get(management, timeout=30).status_code in (400, 401)
    # the inference key does not open the management API
    assert requests.get(management, headers=server.headers("inference"), timeout=30).status_code in (400, 401)
    assert requests.get(management, headers=server.headers("management"), timeout=30).status_code == 200


def test_model_api_is_off(server):
    response = requests.post(f"{server.management_url}/models", params={"url": "x.mar"},
                             headers=server.headers("management"), timeout=30)
    assert response.status_code == 405


def test_scale_to_two_workers_and_back_while_requests_flow(server, imagenet_photos):
    url = f"{server.inference_url}/predictions/{MODEL}"
    files = {f"image{i}": photo for i, photo in enumerate(imagenet_photos[:4])}

    def send():
        return requests.post(url, files=files, headers=server.headers(), timeout=60).status_code

    with Traffic(send, clients=2, max_seconds=240) as traffic:
        scale_down_window = scale_out_and_back(server, MODEL, workers=2, hold_s=3, traffic=traffic)
    lost = traffic.failures_in_flight_during(*scale_down_window)
    print(f"\nrequests during scaling: {len(traffic.outcomes)}, failed: {len(traffic.failures)} "
          f"(in flight on the worker TorchServe stopped: {len(lost)})")
    assert len(traffic.outcomes) >= 4
    assert traffic.failures == lost and len(lost) <= 2
    # maxWorkers is 1 in model-config.yaml: the second worker warns that the cores are now oversubscribed
    worker_log = (server.workdir / "logs" / "model_log.log").read_text()
    assert "2 TorchServe workers are running but maxWorkers is 1" in worker_log
    assert "Set maxWorkers: 2" in worker_log


def test_stopping_leaves_no_process_behind(model_store, imagenet_photos):
    server = TorchServe(model_store, [f"{MODEL}.mar"])
    server.start()
    processes = server.processes()
    assert len(processes) >= 2  # the Java frontend and at least one Python worker
    response = requests.put(f"{server.inference_url}/predictions/{MODEL}", data=imagenet_photos[0],
                            headers=server.headers(), timeout=60)
    assert response.status_code == 200
    server.stop()
    server.cleanup()
    assert not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE for process in processes)


def test_python_client_multipart_and_one_per_request_agree(server, corpus, tmp_path):
    paths = [*sorted((corpus / "imagenet").glob("*.jpg"))[:3], corpus / "mixed" / "rgba.png"]
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"definitely not a JPEG")
    paths.append(bad)
    token = server.keys["inference"]
    together = classify(paths, server.inference_url, MODEL, token)
    separately = classify_one_per_request(paths, server.inference_url, MODEL, token)
    assert len(together) == len(separately) == 5
    assert [indices(e) for e in together[:4]] == [indices(e) for e in separately[:4]]
    assert together[4]["error"]["status"] == separately[4]["error"]["status"] == 415


def test_a_port_taken_before_torchserve_binds_it_is_retried_on_new_ports(model_store):
    """The race a bind-and-release port search leaves open, forced: another process holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = TorchServe(model_store, [f"{MODEL}.mar"])
        server.ports["inference_address"] = taken
        server.start()
        try:
            assert server.ports["inference_address"] != taken
            assert requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=30).status_code == 200
        finally:
            server.stop()
            server.cleanup()
