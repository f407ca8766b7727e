"""The pod's authenticating gateway (deploy/gateway/key_gateway.py) in front of real TorchServes.

Two replicas, as a Service would see them: the shared demo server and a second TorchServe started with a small
memory budget, each with its own random keys and its own gateway process. One client token reaches both; a
flood of maximum-size bodies through a gateway gets 507 (admission) or 413 (too large an image), good requests
beside it get 200, and no process dies or outgrows its budget. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import DEMO_MODEL_NAME, REPO, keep_logs_if_failed

from tests.harness.traffic import Traffic
from tests.harness.ts_server import TorchServe, free_port

sys.path.insert(0, str(REPO / "deploy" / "gateway"))
import key_gateway

CLIENT_TOKEN = "client-token-for-tests-0123456789"
# The small budget of the flood test, scaled down from the pod's (docs/deploy.md, "Memory budget"): bodies up to
# MAX_BODY (over the handler's 20 MiB per image, so an admitted one gets the handler's 413), at most two of them
# in flight, and a JVM of 256 MB heap + 256 MB direct memory.
MAX_BODY = 24_000_000
INFLIGHT = 2 * MAX_BODY + 8_000_000
SMALL_JVM = "-Xmx256m -XX:MaxDirectMemorySize=256m"
JVM_OVERHEAD = 256 * 2**20  # metaspace, code cache, thread stacks, GC structures: measured 70-110 MB here
FLOOD = 14


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


class GatewayProcess:
    """deploy/gateway/key_gateway.py as the pod runs it: its own process, on a free loopback port."""

    def __init__(self, server: TorchServe, tokens_file: Path, max_body: int, inflight: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "deploy" / "gateway" / "key_gateway.py"),
             "--listen", f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{server.ports['inference_address']}",
             "--key-file", str(server.workdir / "key_file.json"), "--tokens-file", str(tokens_file),
             "--max-body-bytes", str(max_body), "--inflight-bytes", str(inflight)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the gateway did not listen within 30 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gateway") / "tokens"
    path.write_text(f"# one token a line\n{CLIENT_TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def small_server(demo_store, request):
    """The second replica: the demo archive in a TorchServe with a small JVM and request limit."""
    server = TorchServe(demo_store, [f"{DEMO_MODEL_NAME}.mar"],
                        extra_config={"vmargs": SMALL_JVM, "max_request_size": str(MAX_BODY)})
    server.start()
    yield server
    server.stop()
    keep_logs_if_failed(server, request)


@pytest.fixture(scope="module")
def gateways(demo_server, small_server, tokens_file):
    started = [GatewayProcess(server, tokens_file, MAX_BODY, INFLIGHT) for server in (demo_server, small_server)]
    yield started
    for gateway in started:
        gateway.stop()


def predict(url: str, token: str, body: bytes, timeout: float = 120, **headers: str) -> requests.Response:
    return requests.post(f"{url}/predictions/{DEMO_MODEL_NAME}", data=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg", **headers})


@pytest.mark.e2e
def test_one_client_token_reaches_every_replica(gateways, demo_server, small_server, samples):
    photo = samples["cat.jpg"]
    answers = []
    for gateway in gateways:
        response = predict(gateway.url, CLIENT_TOKEN, photo)
        assert response.status_code == 200, response.text[:300]
        assert response.headers["Connection"] == "close"
        answers.append(response.json())
    assert answers[0] == answers[1]
    assert answers[0][0]["topk"][0]["label"] in {"tiger cat", "tabby", "Egyptian cat"}
    # What the gateway solves: one replica's own key is refused by the other replica's TorchServe ...
    refused = requests.post(f"{small_server.inference_url}/predictions/{DEMO_MODEL_NAME}", data=photo,
                            headers={**demo_server.headers(), "Content-Type": "image/jpeg"}, timeout=60)
    assert refused.status_code == 400 and "Token Authorization failed" in refused.text
    # ... and TorchServe keys are not client tokens at the gateway either.
    assert predict(gateways[1].url, demo_server.keys["inference"], photo).status_code == 401


@pytest.mark.e2e
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {CLIENT_TOKEN}", "Bearer "])
def test_gateway_refuses_requests_without_the_client_token(gateways, samples, authorization):
    headers = {"Content-Type": "image/jpeg"} | ({"Authorization": authorization} if authorization else {})
    response = requests.post(f"{gateways[0].url}/predictions/{DEMO_MODEL_NAME}", data=samples["cat.jpg"],
                             headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "client token" in response.json()["message"]


@pytest.mark.e2e
def test_gateway_refuses_a_body_over_the_limit_before_taking_it(gateways):
    """The declared size decides: the gateway answers 413 at once, TorchServe never buffers the body."""
    with socket.create_connection(("127.0.0.1", gateways[1].port), timeout=30) as connection:
        connection.sendall(f"POST /predictions/{DEMO_MODEL_NAME} HTTP/1.1\r\nHost: test\r\n"
                           f"Authorization: Bearer {CLIENT_TOKEN}\r\nContent-Type: image/jpeg\r\n"
                           f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        answer = connection.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413 ")
    assert f"the limit is {MAX_BODY}" in answer


class FloodBody:
    """A body of ``size`` zero bytes read in pieces (so requests sends a Content-Length, not chunks); every flood
    request has sent its head and first piece before any sends the rest."""

    def __init__(self, size: int, start: threading.Barrier) -> None:
        self.size, self.start, self.sent = size, start, 0

    def __len__(self) -> int:
        return self.size - self.sent

    def read(self, count: int = -1) -> bytes:
        if self.sent and not self.start.broken:
            with contextlib.suppress(threading.BrokenBarrierError):  # a request answered early stops reading
                self.start.wait(timeout=10)
        count = self.size - self.sent if count < 0 else min(count, self.size - self.sent)
        self.sent += count
        return b"\x00" * count


@pytest.mark.e2e
def test_flood_of_maximum_size_bodies_gets_507_or_413_and_good_requests_keep_200(gateways, small_server, samples):
    gateway = gateways[1]
    frontend = small_server.frontend
    workers = small_server.worker_pids(DEMO_MODEL_NAME)
    photo = samples["cat.jpg"]
    start = threading.Barrier(FLOOD)
    body_size = MAX_BODY - 1000

    def flood(_: int) -> int:
        try:
            response = predict(gateway.url, CLIENT_TOKEN, FloodBody(body_size, start), timeout=180)
        except requests.ConnectionError:
            return -1
        return response.status_code

    def good() -> int:
        response = predict(gateway.url, CLIENT_TOKEN, photo)
        assert response.status_code != 200 or response.json()[0]["topk"][0]["index"] in {281, 282, 285}
        return response.status_code

    with Traffic(good, clients=1, max_seconds=240) as traffic, ThreadPoolExecutor(FLOOD) as pool:
        traffic.wait_for_outcomes(1)
        statuses = list(pool.map(flood, range(FLOOD)))
        traffic.wait_for_outcomes(3)
    good_statuses = [status for _, _, status in traffic.outcomes]
    print(f"\nflood of {FLOOD} x {body_size} bytes: {sorted(statuses)}; good requests beside it: {good_statuses}; "
          f"peak RSS: JVM {peak_rss(frontend.pid) >> 20} MB, worker {[peak_rss(pid) >> 20 for pid in workers]} MB, "
          f"gateway {peak_rss(gateway.process.pid) >> 20} MB")
    assert set(statuses) <= {507, 413}, statuses
    assert 507 in statuses, "the gateway admitted the whole flood at once"
    assert 413 in statuses, "no flood request reached the handler"
    assert good_statuses and set(good_statuses) == {200}
    # Nothing died, nothing restarted, nothing outgrew its budget.
    assert frontend.is_running() and small_server.worker_pids(DEMO_MODEL_NAME) == workers
    assert gateway.process.poll() is None
    assert peak_rss(frontend.pid) < 512 * 2**20 + JVM_OVERHEAD
    assert peak_rss(gateway.process.pid) < 100 * 2**20  # streams: a body never sits whole in the gateway


@pytest.mark.e2e
def test_gateway_follows_a_rotated_key(gateways, small_server, samples):
    """Minting a new inference key rewrites key_file.json; the gateway uses the new key with no restart."""
    old_key = small_server.keys["inference"]
    minted = requests.post(f"{small_server.management_url}/token", params={"type": "inference"},
                           headers=small_server.headers("API"), timeout=30)
    assert minted.status_code == 200, minted.text
    key_file = json.loads((small_server.workdir / "key_file.json").read_text())
    small_server.keys["inference"] = key_file["inference"]["key"]
    assert small_server.keys["inference"] != old_key
    stale = requests.post(f"{small_server.inference_url}/predictions/{DEMO_MODEL_NAME}", data=samples["cat.jpg"],
                          headers={"Authorization": f"Bearer {old_key}", "Content-Type": "image/jpeg"}, timeout=60)
    assert stale.status_code == 400
    assert predict(gateways[1].url, CLIENT_TOKEN, samples["cat.jpg"]).status_code == 200


# Pure parts, no server.


def test_authorization_accepts_only_a_listed_bearer_token():
    tokens = [b"first-token", b"second-token"]
    assert key_gateway.authorized("Bearer second-token", tokens)
    assert key_gateway.authorized("bearer first-token ", tokens)
    for header in (None, "", "Bearer", "Bearer first", "Basic first-token", "Bearer first-token-and-more"):
        assert not key_gateway.authorized(header, tokens), header


def test_admission_counts_bytes_in_flight():
    admission = key_gateway.Admission(max_body_bytes=100, inflight_limit=250)
    first = admission.admit([("Content-Length", "100")])
    second = admission.admit([("content-length", "100")])
    assert admission.admit([]) == 0  # no body: always in
    with pytest.raises(key_gateway.GatewayError) as full:
        admission.admit([("Content-Length", "60")])
    assert full.value.status == 507 and "retry" in full.value.message
    assert admission.admit([("Content-Length", "50")]) == 50
    admission.release(first)
    admission.release(second)
    assert admission.admit([("Transfer-Encoding", "chunked")]) == 100  # unknown size: the most it may be
    for fields, status in (([("Content-Length", "101")], 413), ([("Content-Length", "1e3")], 400),
                           ([("Content-Length", "5"), ("Content-Length", "5")], 400),
                           ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400)):
        with pytest.raises(key_gateway.GatewayError) as refused:
            admission.admit(fields)
        assert refused.value.status == status, fields


def test_head_parsing_refuses_what_is_not_http():
    start, fields = key_gateway.parse_head(b"GET /ping HTTP/1.1\r\nHost: a\r\nX-Thing:  spaced ")
    assert start == "GET /ping HTTP/1.1" and fields == [("Host", "a"), ("X-Thing", "spaced")]
    for head in (b"GET /ping\r\nHost: a", b"GET /ping HTTP/1.1\r\nno colon", b"GET / HTTP/1.1\r\n Host: folded"):
        with pytest.raises(key_gateway.GatewayError):
            key_gateway.parse_head(head)


def test_secrets_follow_their_files(tmp_path):
    key_file, tokens = tmp_path / "key_file.json", tmp_path / "tokens"
    secrets = key_gateway.Secrets(key_file, tokens)
    with pytest.raises(key_gateway.GatewayError, match="not started yet"):
        secrets.inference_key()
    with pytest.raises(key_gateway.GatewayError, match="no client tokens"):
        secrets.client_tokens()
    key_file.write_text(json.dumps({"inference": {"key": "one"}}))
    tokens.write_text("# comment\n\nalpha\n beta \n")
    assert secrets.inference_key() == "one" and secrets.client_tokens() == [b"alpha", b"beta"]
    key_file.write_text(json.dumps({"inference": {"key": "two"}}))
    tokens.write_text("gamma\n")
    bump = time.time() + 5  # a later mtime even on coarse file-system clocks
    for path in (key_file, tokens):
        os.utime(path, (bump, bump))
    assert secrets.inference_key() == "two" and secrets.client_tokens() == [b"gamma"]


def test_chunked_answers_are_copied_to_their_end():
    async def copy() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\nNEXT RESPONSE")
        reader.feed_eof()
        written = bytearray()

        class Sink:
            def write(self, data: bytes) -> None:
                written.extend(data)

            async def drain(self) -> None:
                return None

        body = key_gateway.Buffered(reader, b"4\r\nabcd\r\n")
        await body.copy_chunked(Sink(), 1024)  # type: ignore[arg-type]
        assert body.pending == b"NEXT RESPONSE"
        return bytes(written)

    assert asyncio.run(copy()) == b"4\r\nabcd\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
