"""scripts/serve.py (what scripts/serve.sh runs) end to end: a user's own model, and the ways it can fail.

Each test runs serve.py in a folder of its own (SERVE_HOME: its config.properties with free ports, its
key_file.json, logs and pid file), so it never meets a TorchServe started by hand from the repo.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import zipfile

import psutil
import pytest
import torch
import torchvision
from conftest import REPO

from tests.harness.ts_server import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "r18.pt")
    torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), folder / "r50.pt")
    return folder


@pytest.fixture
def home(tmp_path):
    settings = (REPO / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        settings = settings.replace(f"{key}=http://127.0.0.1:", f"{key}=http://127.0.0.1:{free_port()}#")
    settings = "\n".join(line.split("#")[0] if "_address=http" in line else line for line in settings.splitlines())
    settings += f"\ngrpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
    settings += f"initial_worker_port={free_port()}\n"
    (tmp_path / "config.properties").write_text(settings)
    yield tmp_path
    serve(tmp_path, "stop")


def serve(home, *args, timeout=400):
    env = {**os.environ, "SERVE_HOME": str(home)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), *args], env=env, cwd=home,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def address(home, key):
    line = next(line for line in (home / "config.properties").read_text().splitlines() if line.startswith(key))
    return line.split("=", 1)[1]


def torchserve_processes(home):
    pid_file = home / ".serve" / "tmp" / ".model_server.pid"
    if not pid_file.exists():
        return []
    try:
        frontend = psutil.Process(int(pid_file.read_text()))
        return [frontend, *frontend.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def readme_recipe() -> str:
    """The shell block of README's "Serving your own model" recipe, as a user pastes it."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- recipe: tests/test_serve.py runs this block as pasted -->"):]
    return block[block.index("```bash") + len("```bash"): block.index("```", block.index("```bash") + 7)]


def paste_into(home, block: str) -> str:
    """The block as it runs in ``home``: a folder laid out like the repo root (.venv, samples/, scripts/serve.sh)
    whose serve.sh is serve.py with this test's SERVE_HOME and model store; only the port differs."""
    (home / ".venv").symlink_to(REPO / ".venv")
    (home / "samples").symlink_to(REPO / "samples")
    serve_sh = home / "scripts" / "serve.sh"
    serve_sh.parent.mkdir()
    serve_sh.write_text(f'#!/usr/bin/env bash\nexport SERVE_HOME={shlex.quote(str(home))}\n'
                        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(REPO / "scripts" / "serve.py"))} "$@" '
                        f'--export-path {shlex.quote(str(home / "store"))}\n')
    serve_sh.chmod(0o755)
    return block.replace("http://127.0.0.1:8080", address(home, "inference_address"))


def test_the_readme_recipe_as_pasted_serves_your_own_model_under_your_name(home, samples):
    """The whole block in one shell, after an earlier server's key was read into $TOKEN (README, "Calling it"):
    serve.sh restarts TorchServe, which makes new keys, so the block must read the key again."""
    block = readme_recipe()
    serve_line = next(line for line in block.splitlines() if line.startswith("scripts/serve.sh "))
    model = shlex.split(serve_line)[shlex.split(serve_line).index("--model-name") + 1]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", paste_into(home, block)], cwd=home, capture_output=True,
                          text=True, timeout=400, env={**os.environ, "TOKEN": "a-key-of-an-earlier-server"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "num_classes    10" in done.stdout  # taken from the weights' classifier
    assert f"{address(home, 'inference_address')}/predictions/{model} -T" in done.stdout
    assert "UNTRAINED" not in done.stdout
    answer = json.loads(done.stdout.split("Stop it with: scripts/serve.sh stop", 1)[1])  # curl's, after serve.sh's
    assert isinstance(answer, list) and len(answer[0]["topk"]) == 5, answer  # a stale key: 400 InvalidKeyException
    assert {item["index"] for item in answer[0]["topk"]} <= set(range(10))

    again, _ = serve(home, *shlex.split(serve_line)[1:], "--export-path", str(home / "store"))
    assert again.returncode == 0 and f"already serving {model}" in again.stdout and "built" not in again.stdout

    processes = torchserve_processes(home)
    assert processes
    vmargs = next(line.split("=", 1)[1].split() for line in (REPO / "config.properties").read_text().splitlines()
                  if line.startswith("vmargs="))
    assert set(vmargs) <= set(processes[0].cmdline()), processes[0].cmdline()  # the JVM got config.properties' flags
    stopped, _ = serve(home, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)  # gone when it says so


def test_a_missing_weights_file_is_one_line_naming_it(home):
    done, _ = serve(home, "--arch", "resnet18", "--weights", "no_such_weights.pt", "--model-name", "r18")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"serve.sh: --weights no_such_weights.pt: no such file in {home}"]
    assert torchserve_processes(home) == []


def test_weights_that_do_not_fit_are_refused_at_build_with_the_key_named(home, weights):
    done, seconds = serve(home, "--arch", "resnet18", "--weights", str(weights / "r50.pt"), "--model-name", "r18",
                          "--export-path", str(home / "store"))
    print(f"\nserve.sh with weights that do not fit: error after {seconds:.1f} s")
    assert done.returncode != 0
    assert "layer1.0.conv1.weight has shape (64, 64, 1, 1) in the file but (64, 64, 3, 3) in resnet18" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (home / "store" / "r18.mar").exists() and torchserve_processes(home) == []
    assert seconds < 60


def test_a_model_that_fails_to_load_stops_torchserve_and_says_why_within_60_s(home, weights):
    store = home / "store"
    build = [sys.executable, str(REPO / "scripts" / "build_mar.py"), "--arch", "resnet18", "--weights",
             str(weights / "r18.pt"), "--model-name", "broken", "--export-path", str(store)]
    subprocess.run(build, check=True, capture_output=True)
    corrupt_weights_inside(store / "broken.mar", "broken.pt")
    done, seconds = serve(home, "--arch", "resnet18", "--weights", str(weights / "r18.pt"), "--model-name",
                          "broken", "--export-path", str(store))
    print(f"\nserve.sh with a model that cannot load: exit {done.returncode} after {seconds:.1f} s")
    assert done.returncode != 0
    assert "broken failed to load in the TorchServe worker" in done.stderr
    assert "broken.pt" in done.stderr and "TorchServe was stopped" in done.stderr
    assert seconds < 60
    assert torchserve_processes(home) == []


def corrupt_weights_inside(mar, member):
    """The archive as built, but with its weights file truncated (a disk or copy gone wrong)."""
    with zipfile.ZipFile(mar) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    entries[member] = entries[member][:1000]
    with zipfile.ZipFile(mar, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
