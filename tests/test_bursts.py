"""Bursts against real TorchServe servers: the demo's queue holds a burst the stock one refuses, and the client
rides out 503s (a tiny queue), or gives up within its bound with a message (a model with no worker).

The latency budget the queue is sized for (10 s on a quiet 2-core machine) is a measurement, in
docs/benchmarks.md ("Bursts"); here a burst only has to be answered in full, each request within a bound that
holds on a busy machine too.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from conftest import DEMO_MODEL_NAME, REPO, keep_logs_if_failed

from image_batch_client.client import Client, ClientError
from tests.harness.ts_server import TorchServe

pytestmark = pytest.mark.e2e
MODEL = DEMO_MODEL_NAME
STOCK_QUEUE = 100  # TorchServe's job_queue_size when nothing sets it
BURST = 120  # one-image requests at once: more than the stock queue holds, well within ours
ANSWERED_WITHIN_S = 60  # the burst's slowest answer: about 2 s on a quiet machine, up to ~40 s on a loaded one
TINY_QUEUE = 2
TINY_BURST = 16  # at most 8 (batchSize) in the worker + TINY_QUEUE waiting: some of them are refused
TINY_RETRIES = 8  # waits of 0.5 ... 8 s, 19.75 s at least in all: a loaded machine drains the burst well within


def configured_queue_size() -> int:
    return int(yaml.safe_load((REPO / "model-config.yaml").read_text())["jobQueueSize"])


def burst(server: TorchServe, photos: list[bytes], count: int) -> list[tuple[int, float]]:
    """``count`` one-image requests released at the same moment: (status, seconds) each."""
    start = threading.Barrier(count)

    def one(index: int) -> tuple[int, float]:
        session = requests.Session()
        start.wait()
        began = time.monotonic()
        response = session.post(f"{server.inference_url}/predictions/{MODEL}", data=photos[index % len(photos)],
                                headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
        return response.status_code, time.monotonic() - began

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def archive_with(source_store: Path, folder: Path, **frontend_settings: object) -> Path:
    """A copy of the demo archive whose model-config.yaml also sets ``frontend_settings`` (read by TorchServe)."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source_store / f"{MODEL}.mar") as source, \
            zipfile.ZipFile(folder / f"{MODEL}.mar", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model-config.yaml":
                data = yaml.safe_dump({**yaml.safe_load(data), **frontend_settings}, sort_keys=False).encode()
            target.writestr(item, data)
    return folder


@pytest.fixture(scope="module")
def tiny_queue_server(demo_store, tmp_path_factory, request):
    """The demo with a queue of TINY_QUEUE requests: a burst of one-image requests is mostly refused with 503."""
    store = archive_with(demo_store, tmp_path_factory.mktemp("tiny_queue"), jobQueueSize=TINY_QUEUE)
    server = TorchServe(store, [f"{MODEL}.mar"])
    server.start()
    yield server
    server.stop()
    keep_logs_if_failed(server, request)


def queue_capacity(server: TorchServe) -> int:
    return server.describe(MODEL)["jobQueueStatus"]["remainingCapacity"]


def test_the_demo_queue_answers_a_burst_the_stock_queue_would_refuse(demo_server, imagenet_photos):
    assert queue_capacity(demo_server) == configured_queue_size() > BURST > STOCK_QUEUE
    outcomes = burst(demo_server, imagenet_photos, BURST)
    statuses = sorted({status for status, _ in outcomes})
    seconds = sorted(seconds for _, seconds in outcomes)
    print(f"\nburst of {BURST} one-image requests: p50 {seconds[BURST // 2]:.2f} s, slowest {seconds[-1]:.2f} s")
    assert statuses == [200], f"statuses {statuses}"
    assert seconds[-1] <= ANSWERED_WITHIN_S, f"the slowest of {BURST} requests took {seconds[-1]:.1f} s"


def test_the_client_retries_a_tiny_queue_s_503s_and_gets_every_answer(tiny_queue_server, imagenet_photos):
    assert queue_capacity(tiny_queue_server) == TINY_QUEUE
    photos = imagenet_photos[:TINY_BURST]
    common = {"url": tiny_queue_server.inference_url, "model": MODEL, "token": tiny_queue_server.keys["inference"],
              "transport": "oip-binary", "max_images": 1, "concurrency": len(photos)}
    with Client(**common, retries=0) as client, pytest.raises(ClientError) as refused:  # the burst is refused ...
        client.classify(photos)
    assert "HTTP 503" in str(refused.value) and "retrying is off" in str(refused.value)
    heard = []
    with Client(**common, retries=TINY_RETRIES, on_retry=heard.append) as client:  # ... and ridden out
        entries = client.classify(photos)
    waited = sum(retry.delay_s for retry in client.retried)
    print(f"\n{len(photos)} one-image requests, queue of {TINY_QUEUE}: {len(client.retried)} retries "
          f"(at most {max([r.attempt for r in client.retried], default=0)} of one request), {waited:.1f} s of waits")
    assert all("topk" in entry for entry in entries) and len(entries) == len(photos)
    assert client.retried and heard == client.retried
    assert {retry.reason for retry in client.retried} == {"HTTP 503"}
    assert all(retry.attempt <= TINY_RETRIES for retry in client.retried)


def test_over_grpc_a_full_queue_is_internal_so_it_is_not_retried(tiny_queue_server, imagenet_photos):
    """TorchServe 0.12's gRPC API answers a full queue with INTERNAL, the code of any failure: if it ever answers
    UNAVAILABLE instead, this fails, and the gRPC transport can retry like HTTP does."""
    photos = imagenet_photos[:TINY_BURST]
    with Client(tiny_queue_server.inference_url, MODEL, tiny_queue_server.keys["inference"], transport="grpc",
                max_images=1, concurrency=len(photos), grpc_address=tiny_queue_server.grpc_inference_address) as client:
        with pytest.raises(ClientError, match=r"gRPC API failed: INTERNAL: Model \"efficientnet_lite0\" has no worker"):
            client.classify(photos)
    assert client.retried == []


def test_the_cli_reports_what_it_retried(tiny_queue_server, imagenet_photos, tmp_path):
    for index, photo in enumerate(imagenet_photos[:TINY_BURST]):
        (tmp_path / f"{index:02}.jpg").write_bytes(photo)
    key_file = tiny_queue_server.workdir / "key_file.json"
    done = subprocess.run([sys.executable, "-m", "image_batch_client", str(tmp_path), "--one-per-request",
                           "--concurrency", str(TINY_BURST), "--retries", str(TINY_RETRIES),
                           "--url", tiny_queue_server.inference_url, "--key-file", str(key_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    retry_lines = [line for line in done.stderr.splitlines() if line.startswith("retry ")]
    assert retry_lines and all("HTTP 503" in line for line in retry_lines)
    summary = done.stderr.splitlines()[-1]
    assert summary.startswith(f"{TINY_BURST} images: {TINY_BURST} answered, 0 with an error")
    assert f"{len(retry_lines)} retr" in summary and f"(HTTP 503: {len(retry_lines)})" in summary


def test_the_client_gives_up_on_a_model_without_workers_within_its_bound(tiny_queue_server, imagenet_photos):
    tiny_queue_server.scale(MODEL, 0)
    try:
        with Client(tiny_queue_server.inference_url, MODEL, tiny_queue_server.keys["inference"], transport="raw",
                    retries=3, retry_delay=0.1, retry_delay_max=0.2) as client:
            started = time.monotonic()
            with pytest.raises(ClientError) as refused:
                client.classify(imagenet_photos[:1])
            elapsed = time.monotonic() - started
    finally:  # a worker again, without waiting for it: a later test's retries ride out its start
        requests.put(f"{tiny_queue_server.management_url}/models/{MODEL}", params={"min_worker": 1, "max_worker": 1},
                     headers=tiny_queue_server.headers("management"), timeout=30).raise_for_status()
    message = str(refused.value)
    print(f"\ngave up after {elapsed:.2f} s: {message}")
    assert "has no worker" in message and "gave up after 4 attempts" in message and "--concurrency" in message
    assert [retry.attempt for retry in client.retried] == [1, 2, 3]
    assert client.max_retry_wait_s == pytest.approx(0.1 + 0.2 + 0.2)
    assert elapsed < client.max_retry_wait_s + 5, f"gave up after {elapsed:.1f} s"
