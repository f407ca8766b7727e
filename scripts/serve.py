#!/usr/bin/env python3
"""Serve one model with TorchServe: build its archive when anything it is made from changed, (re)start
TorchServe when what it serves changed, wait until the model answers, and print a ready curl.

    scripts/serve.sh                                            # the trained demo (EfficientNet-Lite0)
    scripts/serve.sh --arch resnet18 --weights r18.pt --model-name r18    # your model, under your name
    scripts/serve.sh stop

Run through scripts/serve.sh, which sets up .venv first. TorchServe runs from the repo root (so
key_file.json lands here) with its pid file and sockets in .serve/tmp. When a worker cannot load the model,
this says why within seconds (from logs/model_log.log), stops TorchServe and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import build_mar  # noqa: E402
from make_corpus import write_samples  # noqa: E402

# Where TorchServe runs, its key_file.json and logs/ land: the repo root (SERVE_HOME lets tests use a folder
# of their own, with its own config.properties and ports).
HOME = Path(os.environ.get("SERVE_HOME", REPO)).resolve()
TS_CONFIG = HOME / "config.properties" if (HOME / "config.properties").exists() else REPO / "config.properties"
STATE_DIR = HOME / ".serve"
STATE_FILE = STATE_DIR / "state.json"
LOGS = HOME / "logs"
SAMPLES = REPO / "samples"
SAMPLE = SAMPLES / "cat.jpg"
READY_TIMEOUT_S = 600
WORKER_STATES = {"UNLOADING": "starting", "LOADING": "starting", "READY": "ready"}  # TorchServe says UNLOADING


def address(key: str) -> str:
    """inference_address / management_address from the config.properties TorchServe starts with."""
    for line in TS_CONFIG.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    raise ServeError(f"{TS_CONFIG} sets no {key}")
FAILURE_MARKERS = ("Backend worker process died", "Load model failed")


class ServeError(Exception):
    """Serving failed; the message says why and what to do."""


def torchserve_env() -> dict[str, str]:
    tmp = STATE_DIR / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp), "TEMP": str(tmp)})  # TEMP: the JVM's java.io.tmpdir (worker sockets)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def frontend() -> psutil.Process | None:
    """The TorchServe this script started, if it is still alive."""
    pid_file = STATE_DIR / "tmp" / ".model_server.pid"
    try:
        process = psutil.Process(int(pid_file.read_text().strip()))
        return process if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None


def stop(quiet: bool = False) -> None:
    """Stop TorchServe through the venv's torchserve and wait until its processes are gone."""
    process = frontend()
    if process is None:
        if not quiet:
            print("TorchServe is not running")
        STATE_FILE.unlink(missing_ok=True)
        return
    processes = [process, *process.children(recursive=True)]
    print(f"stopping TorchServe (pid {process.pid}) ...", flush=True)
    subprocess.run(["torchserve", "--stop"], cwd=HOME, env=torchserve_env(), capture_output=True, check=False)
    _, alive = psutil.wait_procs(processes, timeout=30)
    for leftover in alive:
        leftover.kill()
    psutil.wait_procs(alive, timeout=10)
    STATE_FILE.unlink(missing_ok=True)
    print("stopped")


def archive_digest(mar: Path) -> str:
    return hashlib.sha256(mar.read_bytes()).hexdigest()


def read_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def start(name: str, mar: Path) -> dict[str, int]:
    """Start TorchServe serving only ``name``; return the byte offsets of the logs it starts from."""
    LOGS.mkdir(exist_ok=True)
    offsets = {log: (LOGS / log).stat().st_size if (LOGS / log).exists() else 0
               for log in ("model_log.log", "ts_log.log")}
    print(f">> starting TorchServe with {mar} (logs in {LOGS})", flush=True)
    command = ["torchserve", "--start", "--ts-config", str(TS_CONFIG), "--model-store", str(mar.parent),
               "--models", f"{name}={mar.name}", "--ncs"]
    with (LOGS / "torchserve.out").open("wb") as out:
        started = subprocess.run(command, cwd=HOME, env=torchserve_env(), stdout=out, stderr=subprocess.STDOUT,
                                 check=False)
    if started.returncode != 0:
        raise ServeError(f"torchserve --start failed:\n{(LOGS / 'torchserve.out').read_text()[-2000:]}")
    STATE_FILE.write_text(json.dumps({"model": name, "archive": str(mar), "sha256": archive_digest(mar)}))
    return offsets


def new_log_text(log: str, offsets: dict[str, int]) -> str:
    path = LOGS / log
    if not path.exists():
        return ""
    with path.open("rb") as file:
        file.seek(offsets.get(log, 0))
        return file.read().decode("utf-8", "replace")


def load_failure(offsets: dict[str, int]) -> str | None:
    """The cause of a worker that failed to load the model, from the logs written since the start."""
    if not any(marker in new_log_text("ts_log.log", offsets) for marker in FAILURE_MARKERS):
        return None
    lines = [re.sub(r"^.*? MODEL_LOG - ", "", line) for line in new_log_text("model_log.log", offsets).splitlines()
             if " MODEL_LOG - " in line]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return "a worker died while loading the model (no traceback in logs/model_log.log)"
    traceback = lines[starts[0]:]
    end = next((i for i, line in enumerate(traceback) if i and re.match(r"^[A-Za-z_.]+(Error|Exception|Exit)\b", line)),
               len(traceback) - 1)
    return "\n".join(["  " + line for line in traceback[max(0, end - 6): end + 1]])


def keys() -> dict[str, str]:
    raw = json.loads((HOME / "key_file.json").read_text())
    return {kind: raw[kind]["key"] for kind in ("inference", "management")}


def worker_states(name: str) -> list[str]:
    response = requests.get(f"{address('management_address')}/models/{name}", timeout=5,
                            headers={"Authorization": f"Bearer {keys()['management']}"})
    response.raise_for_status()
    return [worker["status"] for worker in response.json()[0]["workers"]]


def wait_until_ready(name: str, offsets: dict[str, int]) -> None:
    """Poll until a worker is READY; fail within seconds when a worker cannot load the model."""
    began = time.monotonic()
    last_note = ""
    while time.monotonic() - began < READY_TIMEOUT_S:
        if frontend() is None:
            raise ServeError("TorchServe exited during start-up:\n" + new_log_text("ts_log.log", offsets)[-2000:])
        failure = load_failure(offsets)
        if failure is not None:
            stop(quiet=True)
            raise ServeError(f"{name} failed to load in the TorchServe worker; the cause, from "
                             f"logs/model_log.log:\n{failure}\nTorchServe was stopped.")
        try:
            states = worker_states(name)
            note = f"worker {', '.join(WORKER_STATES.get(s, s.lower()) for s in states) or 'not started yet'}"
            if "READY" in states:
                return
        except (OSError, ValueError, KeyError, IndexError, requests.RequestException):
            note = "the frontend is starting"
        if note != last_note or int(time.monotonic() - began) % 10 == 0:
            print(f"   waiting for {name}: {note} ({time.monotonic() - began:.0f} s)", flush=True)
            last_note = note
        time.sleep(1)
    stop(quiet=True)
    raise ServeError(f"{name} was not ready after {READY_TIMEOUT_S} s; see logs/model_log.log. TorchServe was stopped.")


def served_model_step() -> str | None:
    """The worker's own account of the model step it chose at start-up (backend, precision, accuracy check)."""
    path = LOGS / "model_log.log"
    if not path.exists():
        return None
    lines = [line for line in path.read_text(errors="replace").splitlines() if " model step: " in line]
    return "model step: " + lines[-1].split(" model step: ", 1)[1] if lines else None


def show_ready(name: str, info: dict) -> None:
    token = keys()["inference"]
    url = f"{address('inference_address')}/predictions/{name}"
    response = requests.put(url, data=SAMPLE.read_bytes(), headers={"Authorization": f"Bearer {token}"}, timeout=120)
    if response.status_code != 200:
        raise ServeError(f"the sample request answered HTTP {response.status_code}: {response.text[:500]}")
    best = ", ".join(f"{item['label']} {item['score']:.2f}" for item in response.json()[0]["topk"][:3])
    weights = info.get("weights", {})
    print(f"\nTorchServe is serving {name} ({info.get('architecture')}, weights: "
          f"{weights.get('file') or weights.get('source')}) at {address('inference_address')}")
    if weights.get("source") == "random":
        print("   UNTRAINED: random weights, its labels mean nothing. Serve real ones with --weights FILE.")
    step = served_model_step()
    if step:
        print(f"   {step}")
    print(f"   {SAMPLE.relative_to(REPO)} -> {best}\n\nTry it (from {HOME}):\n")
    print("  TOKEN=$(python3 -c \"import json; print(json.load(open('key_file.json'))['inference']['key'])\")")
    print(f"  curl -H \"Authorization: Bearer $TOKEN\" {url} -T {os.path.relpath(SAMPLE, HOME)}\n")
    print("Stop it with: scripts/serve.sh stop")


def serve(argv: list[str]) -> None:
    build_args = build_mar.parse_args([*argv, "--if-changed", "--force"])
    write_samples(SAMPLES)
    mar = build_mar.build(build_args)
    info = build_mar.existing_build_info(mar) or {}
    name = info.get("model_name", mar.stem)
    running = frontend()
    state = read_state()
    if running is not None and state.get("model") == name and state.get("sha256") == archive_digest(mar):
        print(f">> TorchServe is already serving {name} from this archive")
    else:
        if running is not None:
            print(f">> TorchServe serves {state.get('model', 'another model')}; restarting it with {name}")
            stop(quiet=True)
        elif (STATE_DIR / "tmp" / ".model_server.pid").exists():
            (STATE_DIR / "tmp" / ".model_server.pid").unlink()  # left by a TorchServe that is gone
        offsets = start(name, mar)
        wait_until_ready(name, offsets)
    show_ready(name, info)


def main() -> int:
    if sys.argv[1:2] == ["stop"]:
        stop()
        return 0
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        print("Options (passed to scripts/build_mar.py):")
        build_mar.parse_args(["--help"])
    try:
        serve(sys.argv[1:])
    except (ServeError, build_mar.BuildError, build_mar.ConfigError) as error:
        print(f"\nserve.sh: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
