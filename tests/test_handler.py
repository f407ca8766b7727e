"""The TorchServe handler without a server, driven through TorchServe's own Context class."""

import base64
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import torchvision
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.backends import ModelStep
from handler.device import DEVICE_LOST_EXIT_CODE
from handler.engine import Timings
from handler.model import BUILD_INFO_FILE, LABELS_FILE
from handler.server_metrics import ServerMetrics
from handler.torchserve_handler import ImageBatchHandler

METRICS_YAML = str(__import__("ts").__path__[0]) + "/configs/metrics.yaml"
REPO = Path(__file__).resolve().parent.parent

# A worker process whose model hits a simulated sticky CUDA error (the device's health probe then fails too).
LOST_DEVICE_WORKER = """
import sys
from pathlib import Path

from tests.harness.simulated_device import SimulatedRuntime, sticky_error
from test_handler import make_context
from ts.context import RequestProcessor

from handler.backends import ModelStep
from handler.torchserve_handler import ImageBatchHandler

model_dir, photo = sys.argv[1], Path(sys.argv[2]).read_bytes()
handler = ImageBatchHandler()
handler.initialize(make_context(model_dir, 1))


def faulting_model(images):
    raise sticky_error()


handler.engine.use_step(ModelStep("eager", "fp32", faulting_model))
handler.engine.runtime = SimulatedRuntime(lost=True)
context = make_context(model_dir, 1)
context.request_processor = [RequestProcessor({})]
handler.handle([{"body": bytearray(photo)}], context)
print("handle returned")
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), folder / "weights.pt")
    (folder / LABELS_FILE).write_text(json.dumps({str(i): f"class-{i}" for i in range(1000)}))
    (folder / BUILD_INFO_FILE).write_text(json.dumps({"weights": {"source": "random", "seed": 0}}))
    return folder


def make_context(model_dir, batch_size, **handler_settings):
    metrics = MetricsCacheYamlImpl(METRICS_YAML)
    metrics.initialize_cache()
    context = Context(
        "tiny", str(model_dir), {"model": {"modelName": "tiny", "serializedFile": "weights.pt"}},
        batch_size, None, "0.12.0", metrics=metrics,
        model_yaml_config={"maxWorkers": 1, "handler": {"architecture": "resnet18", "max_batch": 4,
                                                        "decode_threads": 2, "backend": "eager",
                                                        **handler_settings}},
    )
    return context


@pytest.fixture(scope="module")
def handler(model_dir):
    handler = ImageBatchHandler()
    handler.initialize(make_context(model_dir, 8))
    yield handler
    handler.engine.close()


def run_batch(handler, model_dir, rows):
    context = make_context(model_dir, len(rows))
    context.request_processor = [RequestProcessor({}) for _ in rows]
    context.metrics.set_request_ids({i: f"req-{i}" for i in range(len(rows))})
    bodies = handler.handle(rows, context)
    assert len(bodies) == len(rows)
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(rows)))
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    return [json.loads(body) for body in bodies], statuses, context


def b64(data):
    return base64.b64encode(data).decode()


def test_untrained_weights_are_announced_loudly(model_dir, caplog):
    caplog.set_level(logging.WARNING)
    handler = ImageBatchHandler()
    handler.initialize(make_context(model_dir, 1))
    assert handler.untrained
    assert "UNTRAINED" in caplog.text and "predictions are meaningless" in caplog.text
    handler.engine.close()


def test_one_answer_per_request_with_malformed_requests_and_corrupt_images(handler, model_dir, imagenet_photos):
    good = imagenet_photos[:4]
    rows = [
        {"body": bytearray(good[0])},                                               # raw, good
        {"body": bytearray(b'{"images": [')},                                       # broken JSON
        {"a": bytearray(good[1]), "b": bytearray(good[2][:300]), "c": bytearray(good[3])},  # corrupt in middle
        {"body": {"images": [b64(good[1]), "%%%"], "topk": 2}},                     # JSON with bad base64
        {"body": bytearray()},                                                      # empty
        {"body": bytearray(b"GIF89a-not-really")},                                  # one image, damaged GIF
        {"body": bytearray(b"plain words, no image")},                              # one image, not an image
        {"body": {"images": [b64(good[0])] * 65}},                                  # too many images
    ]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert len(responses) == len(rows)
    assert statuses == [200, 400, 200, 200, 400, 400, 415, 413]

    alone = {i: handler.engine.predict([good[i]])[0] for i in range(4)}
    assert [t["index"] for t in responses[0][0]["topk"]] == [i for i, _ in alone[0]]
    assert responses[0][0]["topk"][0]["label"] == f"class-{alone[0][0][0]}"
    assert "not valid JSON" in responses[1]["error"]["message"]
    assert [t["index"] for t in responses[2][0]["topk"]] == [i for i, _ in alone[1]]
    assert responses[2][1]["error"]["status"] == 400 and "corrupt" in responses[2][1]["error"]["message"]
    assert [t["index"] for t in responses[2][2]["topk"]] == [i for i, _ in alone[3]]
    assert len(responses[3][0]["topk"]) == 2 and "base64" in responses[3][1]["error"]["message"]
    assert responses[4]["error"]["status"] == 400
    assert "starts like a GIF file" in responses[5]["error"]["message"]
    assert "unsupported" in responses[6]["error"]["message"]
    assert "limit is 64 per request" in responses[7]["error"]["message"]


def test_kserve_bodies_answer_in_their_own_shape(handler, model_dir, imagenet_photos):
    rows = [
        {"body": {"instances": [{"data": b64(imagenet_photos[0])}, {"b64": b64(imagenet_photos[1])}]}},
        {"body": {"id": "abc", "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                           "data": [b64(imagenet_photos[2])]}]}},
    ]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert statuses == [200, 200]
    assert len(responses[0]["predictions"]) == 2 and "topk" in responses[0]["predictions"][1]
    assert responses[1]["id"] == "abc" and responses[1]["model_name"] == "tiny"
    assert "topk" in json.loads(responses[1]["outputs"][0]["data"][0])


def test_a_failing_model_answers_every_request_with_500(handler, model_dir, imagenet_photos, monkeypatch):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(handler.engine, "step", ModelStep("eager", "fp32", broken_forward))
    rows = [{"body": bytearray(imagenet_photos[0])}, {"a": bytearray(imagenet_photos[1]), "b": bytearray(b"x")}]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert statuses == [500, 200]
    assert responses[0]["error"]["status"] == 500
    assert responses[1][0]["error"]["status"] == 500 and responses[1][1]["error"]["status"] == 415


def emitted_metrics(caplog) -> dict[str, list[tuple[float, str]]]:
    """The metric lines TorchServe's metrics cache logged: name -> [(value, dimensions)]."""
    found: dict[str, list[tuple[float, str]]] = {}
    for record in caplog.records:
        match = re.match(r"\[METRICS\](\w+)\.\w+:([0-9.e+-]+)\|#([^|]*)\|", record.getMessage())
        if match:
            found.setdefault(match.group(1), []).append((float(match.group(2)), match.group(3)))
    return found


def test_batch_metrics_are_recorded_with_their_values(handler, model_dir, imagenet_photos, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics")
    rows = [{"a": bytearray(imagenet_photos[0]), "b": bytearray(b"zz"), "c": bytearray(imagenet_photos[1])},
            {"body": bytearray(imagenet_photos[2])}, {"body": {"images": ["%%%"]}}]
    run_batch(handler, model_dir, rows)
    metrics = emitted_metrics(caplog)
    assert [value for value, _ in metrics["ImagesProcessed"]] == [3]  # classified
    assert sorted((dims.split(",")[0], value) for value, dims in metrics["ImagesRejected"]) == [
        ("Status:400", 1), ("Status:415", 1)]
    assert [value for value, _ in metrics["RequestsPerBatch"]] == [3]
    assert [value for value, _ in metrics["ImagesPerRequest"]] == [pytest.approx(5 / 3)]
    for name in ("InferenceTime", "DecodeWaitTime", "BatchHandleTime"):
        [(milliseconds, _)] = metrics[name]
        assert 0 < milliseconds < 60_000, name
    [(handle_ms, _)] = metrics["BatchHandleTime"]
    assert handle_ms >= metrics["InferenceTime"][0][0]


class RecordingCache:
    """Stands in for TorchServe's metrics cache: keeps what each add_* call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, str]] = []

    def add_counter(self, name, value, dimensions=None):
        self.calls.append(("counter", name, value, ",".join(f"{d.name}:{d.value}" for d in dimensions or [])))

    def add_metric(self, name, value, unit, metric_type=None):
        self.calls.append(("metric", name, value, unit))

    def add_time(self, name, value):
        self.calls.append(("time", name, value, "ms"))


def test_each_metric_gets_its_own_value_in_its_own_unit():
    cache = RecordingCache()
    timings = Timings(decode_wait=0.011, inference=0.023, images=7, rejected={413: 1, 400: 2})
    ServerMetrics(cache).record(requests=2, timings=timings, handle_seconds=0.05)
    assert cache.calls == [
        ("counter", "ImagesProcessed", 4, ""),
        ("metric", "RequestsPerBatch", 2, "count"),
        ("metric", "ImagesPerRequest", 3.5, "count"),
        ("time", "DecodeWaitTime", pytest.approx(11.0), "ms"),
        ("time", "InferenceTime", pytest.approx(23.0), "ms"),
        ("time", "BatchHandleTime", pytest.approx(50.0), "ms"),
        ("counter", "ImagesRejected", 2, "Status:400"),
        ("counter", "ImagesRejected", 1, "Status:413"),
    ]


def test_a_step_that_fails_at_warm_up_is_replaced_by_eager_fp32(model_dir, imagenet_photos, tmp_path,
                                                                 monkeypatch, caplog):
    """No gate photos in this archive, so inductor's compiler first runs at warm-up: without a working C++
    compiler it fails there, and the eager model serves. (The step's own compiler check, which refuses it before
    warm-up, is switched off here: tests/test_backends.py tests it.)"""
    from handler import backends

    monkeypatch.setattr(backends, "require_cpp_compiler", lambda: None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled before
    caplog.set_level(logging.WARNING)
    handler = ImageBatchHandler()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # no C++ compiler to be found
        handler.initialize(make_context(model_dir, 1, backend="inductor", cache_dir=str(tmp_path)))
    assert handler.engine.step.describe() == "eager fp32"
    assert "failed during warm-up; serving eager fp32" in caplog.text
    responses, statuses, _ = run_batch(handler, model_dir, [{"body": bytearray(imagenet_photos[0])}])
    assert statuses == [200] and "topk" in responses[0][0]
    handler.engine.close()


def test_a_request_that_breaks_the_parser_fails_alone(handler, model_dir, imagenet_photos, monkeypatch, caplog):
    from handler import torchserve_handler

    real_parse = torchserve_handler.parse_request

    def parse_or_explode(row, limits, header_length=None):
        if "explode" in row:
            raise KeyError("a bug met by this request only")
        return real_parse(row, limits, header_length)

    monkeypatch.setattr(torchserve_handler, "parse_request", parse_or_explode)
    deep = bytearray(b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    rows = [{"body": bytearray(imagenet_photos[0])}, {"explode": bytearray(b"x")}, {"body": deep},
            {"a": bytearray(imagenet_photos[1])}]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert statuses == [200, 500, 400, 200]
    assert "topk" in responses[0][0] and "topk" in responses[3][0]
    assert "see the server log" in responses[1]["error"]["message"]
    assert "nested deeper than 32 levels" in responses[2]["error"]["message"]
    assert "could not parse request 1" in caplog.text


def test_a_response_that_cannot_be_encoded_fails_alone(handler, model_dir, imagenet_photos, monkeypatch):
    from handler import torchserve_handler

    real_encode = torchserve_handler.encode_response

    def encode_or_explode(request, entries, model_name, tensors=None):
        if request.envelope == "kserve_v1":
            entries = [{**entry, "unserializable": object()} for entry in entries]
        return real_encode(request, entries, model_name, tensors)

    monkeypatch.setattr(torchserve_handler, "encode_response", encode_or_explode)
    rows = [{"body": {"instances": [{"data": b64(imagenet_photos[0])}]}}, {"body": bytearray(imagenet_photos[1])}]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert statuses == [500, 200]
    assert responses[0]["error"]["status"] == 500 and "topk" in responses[1][0]


def test_an_engine_bug_answers_every_image_with_500_instead_of_failing_the_batch(handler, model_dir,
                                                                               imagenet_photos, monkeypatch):
    def broken_predict(*args, **kwargs):
        raise IndexError("a bug outside the model (simulated)")

    monkeypatch.setattr(handler.engine, "predict_outputs", broken_predict)
    rows = [{"body": bytearray(b"")}, {"a": bytearray(imagenet_photos[0]), "b": bytearray(imagenet_photos[1])}]
    responses, statuses, _ = run_batch(handler, model_dir, rows)
    assert statuses == [400, 200]
    assert [entry["error"]["status"] for entry in responses[1]] == [500, 500]


def test_a_lost_device_ends_the_worker_process_after_logging(model_dir, imagenet_photos, tmp_path):
    """Every later batch would fail on a poisoned CUDA context, and TorchServe restarts only a worker that exits."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(imagenet_photos[0])
    path = os.pathsep.join(str(REPO / folder) for folder in ("", "tests", "scripts", "bench", "client"))
    worker = subprocess.run([sys.executable, "-c", LOST_DEVICE_WORKER, str(model_dir), str(photo)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=300)
    assert worker.returncode == DEVICE_LOST_EXIT_CODE, worker.stderr[-3000:]
    assert "ending this worker so that TorchServe starts a fresh one" in worker.stderr
    assert "illegal memory access" in worker.stderr  # the original error is logged with it
    assert "handle returned" not in worker.stdout
