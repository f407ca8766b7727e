"""The client without TorchServe: how it splits a batch, finds files and keys, fails with a message, and retries
what a scripted HTTP server refuses (tests/test_bursts.py does the same against real TorchServe servers)."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO

import image_batch_client
from image_batch_client.cli import parse_args
from image_batch_client.client import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_DELAY_MAX,
    Client,
    ClientError,
    checkout_key_file,
    find_key_file,
    image_files,
    longest_wait,
    retry_delay,
)
from tests.harness.ts_server import free_port


def run_cli(*args, cwd):
    """The command line of the image_batch_client these tests import (under mutation testing: the mutants' copy, not
    the one .venv has installed)."""
    package_root = Path(image_batch_client.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "image_batch_client", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("sizes", "max_images", "max_bytes", "expected"),
    [
        ([10] * 5, 2, 10**9, [(0, 2), (2, 4), (4, 5)]),
        ([3, 3, 3, 3], 10, 7, [(0, 2), (2, 4)]),
        ([50, 1, 1, 50, 1], 10, 20, [(0, 1), (1, 3), (3, 4), (4, 5)]),  # an image over max_bytes goes alone
        ([], 4, 10, []),
    ],
)
def test_a_batch_is_split_into_consecutive_requests_by_count_and_bytes(sizes, max_images, max_bytes, expected):
    assert Client(max_images=max_images, max_bytes=max_bytes).plan(sizes) == expected
    assert Client(transport="raw").plan([1] * 3) == [(0, 1), (1, 2), (2, 3)]
    assert Client().classify([]) == []


def test_directories_give_their_images_recursively_in_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/2.JPG", "a.png", "b/1.webp", ".hidden/x.jpg", "notes.txt", ".x.jpg"):
        (tmp_path / name).write_bytes(b"x")
    named = tmp_path / "notes.txt"  # a file named explicitly is always sent
    assert image_files([tmp_path, named]) == [tmp_path / "a.png", tmp_path / "b/1.webp", tmp_path / "b/2.JPG", named]
    with pytest.raises(ClientError, match="no such file"):
        image_files([tmp_path / "missing.jpg"])


def test_key_file_is_found_in_this_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key_file.json").write_text("{}")
    assert find_key_file() == tmp_path / "key_file.json"
    assert find_key_file(tmp_path / "key_file.json") == tmp_path / "key_file.json"
    with pytest.raises(ClientError, match=r"no TorchServe key file at .*elsewhere\.json"):
        find_key_file(tmp_path / "elsewhere.json")


def test_the_library_and_client_do_not_import_torch():
    code = ("import sys, image_batch_client.client, image_batch_client.cli; "
            "assert 'torch' not in sys.modules and 'ts' not in sys.modules, 'torch or TorchServe imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_wire_format_the_handler_imports_needs_only_the_standard_library():
    """An archive carries image_batch_client/__init__.py and oip.py alone: importing them must not reach further."""
    code = ("import sys; import image_batch_client.oip; from image_batch_client import oip; "
            "loaded = sorted(m for m in sys.modules if m.startswith('image_batch_client') or m == 'requests'); "
            "assert loaded == ['image_batch_client', 'image_batch_client.oip'], loaded")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_checkouts_key_file_is_the_last_resort_of_a_client_installed_from_the_checkout():
    assert checkout_key_file() == REPO / "key_file.json"  # .venv has client/ installed editable


def test_cli_says_the_server_is_not_running(tmp_path, imagenet_photos):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(imagenet_photos[0])
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    done = run_cli(photo, "--url", f"http://127.0.0.1:{free_port()}", "--key-file", key_file, cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot reach TorchServe" in done.stderr and "scripts/serve.sh" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_says_the_key_file_is_missing_and_refuses_missing_paths(tmp_path, imagenet_photos):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(imagenet_photos[0])
    given = run_cli(photo, "--key-file", tmp_path / "nope.json", cwd=tmp_path)
    assert given.returncode == 1 and "no TorchServe key file" in given.stderr and "Traceback" not in given.stderr
    if not checkout_key_file().exists():  # a server started by scripts/serve.sh would be found from anywhere
        default = run_cli(photo, cwd=tmp_path)
        assert default.returncode == 1 and str(checkout_key_file()) in default.stderr
    missing = run_cli(tmp_path / "missing.jpg", cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


class ScriptedServer:
    """A real HTTP server on a free loopback port that answers each POST with the next (status, body) of a script
    (the last one repeats): TorchServe's answers, with no TorchServe behind them."""

    def __init__(self, answers: list[tuple[int, bytes]], port: int | None = None) -> None:
        self.answers, self.received = answers, 0
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, body = scripted.answers[min(scripted.received, len(scripted.answers) - 1)]
                scripted.received += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


ANSWER = (200, json.dumps([{"topk": [{"label": "tabby", "index": 281, "score": 0.9}]}]).encode())
QUEUE_FULL = (503, json.dumps({"code": 503, "type": "ServiceUnavailableException",
                               "message": 'Model "m" has no worker to serve inference request.'}).encode())
FAST = {"retry_delay": 0.02, "retry_delay_max": 0.08}


@pytest.fixture
def scripted():
    servers = []

    def start(answers, port=None):
        servers.append(ScriptedServer(answers, port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_retry_waits_double_up_to_a_cap_and_are_jittered_within_each_step():
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0)]:
        delays = [retry_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # spread out, not one value
    assert longest_wait(DEFAULT_RETRIES, DEFAULT_RETRY_DELAY, DEFAULT_RETRY_DELAY_MAX) == 15.5
    assert longest_wait(0, 0.5, 8.0) == 0
    with pytest.raises(ValueError, match="retries"):
        Client(retries=-1)


def test_a_503_is_retried_and_every_retry_is_reported(scripted):
    server = scripted([QUEUE_FULL, QUEUE_FULL, ANSWER])
    heard = []
    with Client(server.url, "m", transport="raw", on_retry=heard.append, **FAST) as client:
        assert client.classify([b"jpeg"]) == json.loads(ANSWER[1])
    assert server.received == 3
    assert [(r.reason, r.attempt) for r in client.retried] == [("HTTP 503", 1), ("HTTP 503", 2)]
    assert "has no worker" in client.retried[0].detail and heard == client.retried
    assert 0.01 <= client.retried[0].delay_s <= 0.02 and 0.02 <= client.retried[1].delay_s <= 0.04


def test_a_server_that_keeps_refusing_is_given_up_on_after_the_bound(scripted):
    server = scripted([QUEUE_FULL])
    with Client(server.url, "m", transport="raw", retries=3, **FAST) as client:
        started = time.monotonic()
        with pytest.raises(ClientError, match=r"HTTP 503: Model \"m\" has no worker.*gave up after 4 attempts"):
            client.classify([b"jpeg"])
        assert time.monotonic() - started < client.max_retry_wait_s + 2
    assert server.received == 4 and len(client.retried) == 3


def test_retrying_off_sends_once_and_says_so(scripted):
    server = scripted([QUEUE_FULL, ANSWER])
    with Client(server.url, "m", transport="raw", retries=0) as client, \
            pytest.raises(ClientError, match="retrying is off"):
        client.classify([b"jpeg"])
    assert server.received == 1 and client.retried == []


def test_other_errors_are_not_retried(scripted):
    server = scripted([(500, json.dumps({"code": 500, "type": "InternalServerException",
                                         "message": "Worker died."}).encode()), ANSWER])
    with Client(server.url, "m", transport="raw", **FAST) as client, pytest.raises(ClientError, match="Worker died"):
        client.classify([b"jpeg"])
    assert server.received == 1 and client.retried == []


def test_a_refused_connection_is_retried_only_once_the_server_has_answered(scripted):
    port = free_port()
    with Client(f"http://127.0.0.1:{port}", "m", transport="raw", **FAST) as client:
        started = time.monotonic()
        with pytest.raises(ClientError, match="cannot reach TorchServe"):  # never answered: nothing listens there
            client.classify([b"jpeg"])
        assert time.monotonic() - started < 1 and client.retried == []
    first = scripted([ANSWER], port)
    with Client(first.url, "m", transport="raw", retry_delay=0.2, retry_delay_max=1.0) as client:
        client.classify([b"jpeg"])
        first.close()  # the server restarts: down for a moment, then back on the same port
        threading.Timer(0.3, scripted, args=([ANSWER], port)).start()
        assert client.classify([b"jpeg"]) == json.loads(ANSWER[1])
    assert client.retried and {r.reason for r in client.retried} == {"connection refused"}


def test_cli_prints_each_retry_and_counts_them_in_the_summary(scripted, tmp_path):
    server = scripted([QUEUE_FULL, ANSWER])
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"jpeg")
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    done = run_cli(photo, "--url", server.url, "--model", "m", "--key-file", key_file, "--one-per-request",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("retry 1 of 5 in ") and "HTTP 503 (Model \"m\" has no worker" in lines[0]
    assert lines[-1].endswith(", 1 retry (HTTP 503: 1)")
    always_refusing = scripted([QUEUE_FULL])
    refused = run_cli(photo, "--url", always_refusing.url, "--model", "m", "--key-file", key_file, "--no-retry",
                      cwd=tmp_path)
    assert refused.returncode == 1 and always_refusing.received == 1
    assert "error: TorchServe refused the request (HTTP 503" in refused.stderr and "retrying is off" in refused.stderr


def test_cli_retry_flags():
    assert parse_args(["--no-retry", __file__]).retries == 0
    assert parse_args(["--retries", "2", __file__]).retries == 2
    assert parse_args([__file__]).retries == DEFAULT_RETRIES


def test_cli_says_which_files_in_a_folder_it_skipped(scripted, tmp_path):
    server = scripted([ANSWER])
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpeg")
    (folder / "notes.txt").write_text("not a photo")
    (folder / "scan.heic").write_bytes(b"heic")
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    done = run_cli(folder, "--url", server.url, "--model", "m", "--key-file", key_file, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 2 files without an image suffix (")
    assert str(folder / "notes.txt") in skipped[0] and str(folder / "scan.heic") in skipped[0]
    assert done.stderr.splitlines()[-1].startswith("1 image: 1 answered")
    assert len(done.stdout.splitlines()) == 1


def test_grpc_without_its_extra_is_one_line_saying_what_to_install(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"jpeg")
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    code = ("import sys; sys.modules['grpc'] = None; from image_batch_client.cli import main; "  # as if not installed
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, str(photo), "--transport", "grpc", "--key-file", str(key_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: the grpc transport needs grpcio and protobuf")
    assert "pip install grpcio protobuf" in done.stderr
