"""The client package as someone outside the repository gets it: `pip install <repo>/client` into a fresh venv (no
torch there), then a folder of photos classified against the demo server from Python and from the command line, with
the same answers as the client the repository itself uses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from image_batch_client import Client

pytestmark = pytest.mark.e2e

CLASSIFY_FROM_PYTHON = """
import json, sys
from pathlib import Path
from image_batch_client import Client, read_keys

url, key_file, folder = sys.argv[1:]
photos = sorted(path for path in Path(folder).iterdir() if path.suffix == ".jpg")
with Client(url, token=read_keys(key_file)["inference"]) as client:
    print(json.dumps([[path.name, entry] for path, entry in zip(photos, client.classify(photos))]))
"""


@pytest.fixture(scope="module")
def outside_venv(tmp_path_factory):
    """A fresh venv in a folder outside the repository, with the client package pip-installed from client/."""
    folder = tmp_path_factory.mktemp("outside")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True, capture_output=True, timeout=120)
    installed = subprocess.run([str(folder / "venv" / "bin" / "pip"), "install", "--quiet",
                                "--disable-pip-version-check", str(REPO / "client")], cwd=folder, capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    print(f"\nfresh venv with pip install {REPO / 'client'}: {time.monotonic() - started:.1f} s")
    return folder


@pytest.fixture(scope="module")
def photo_folder(outside_venv, samples):
    folder = outside_venv / "photos"
    folder.mkdir()
    for name, data in samples.items():
        if name.endswith(".jpg"):
            (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_the_installed_client_classifies_a_folder_like_the_repos_own_client(outside_venv, photo_folder,
                                                                              demo_server):
    venv, key_file = outside_venv / "venv", demo_server.workdir / "key_file.json"
    photos = sorted(photo_folder.glob("*.jpg"))
    with Client(demo_server.inference_url, token=demo_server.keys["inference"]) as client:
        expected = {path.name: entry for path, entry in zip(photos, client.classify(photos), strict=True)}
    assert all("topk" in entry for entry in expected.values())

    from_python = subprocess.run([str(venv / "bin" / "python"), "-c", CLASSIFY_FROM_PYTHON, demo_server.inference_url,
                                  str(key_file), str(photo_folder)], cwd=outside_venv, capture_output=True, text=True,
                                 timeout=120)
    assert from_python.returncode == 0, from_python.stderr[-3000:]
    assert_same_answers(dict(json.loads(from_python.stdout)), expected)

    command = subprocess.run([str(venv / "bin" / "image-batch-client"), "--jsonl", "--url", demo_server.inference_url,
                              "--key-file", str(key_file), str(photo_folder)], cwd=outside_venv, capture_output=True,
                             text=True, timeout=120)
    assert command.returncode == 0, command.stderr[-3000:]
    lines = [json.loads(line) for line in command.stdout.splitlines()]
    assert_same_answers({Path(line.pop("file")).name: line for line in lines}, expected)
    assert "skipped 1 file without an image suffix" in command.stderr and "notes.txt" in command.stderr
    assert command.stderr.splitlines()[-1].startswith(f"{len(photos)} images: {len(photos)} answered, 0 with an error")


def test_the_venv_the_client_went_into_has_no_torch(outside_venv):
    venv = outside_venv / "venv"
    for module in ("torch", "ts", "handler"):
        done = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], cwd=outside_venv,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (module, done.stderr)


def assert_same_answers(answers: dict[str, dict], expected: dict[str, dict]) -> None:
    """The same classes in the same order for every photo, and the same scores (same server, same requests)."""
    assert answers.keys() == expected.keys()
    for name, entry in answers.items():
        assert [item["index"] for item in entry["topk"]] == [item["index"] for item in expected[name]["topk"]], name
        assert [item["score"] for item in entry["topk"]] == pytest.approx(
            [item["score"] for item in expected[name]["topk"]], abs=1e-4), name
