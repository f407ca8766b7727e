"""The client without a server: how it splits a batch, finds files and keys, and fails with a message."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from ts_client import DEFAULT_KEY_FILE, Client, ClientError, find_key_file, image_files
from ts_server import free_port

CLIENT = REPO / "scripts" / "client.py"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(CLIENT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


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
    code = ("import sys; sys.path.insert(0, 'scripts'); import ts_client, client; "
            "assert 'torch' not in sys.modules and 'ts' not in sys.modules, 'torch or TorchServe imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


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
    if not DEFAULT_KEY_FILE.exists():  # a server started by scripts/serve.sh would be found from anywhere
        default = run_cli(photo, cwd=tmp_path)
        assert default.returncode == 1 and str(DEFAULT_KEY_FILE) in default.stderr
    missing = run_cli(tmp_path / "missing.jpg", cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
