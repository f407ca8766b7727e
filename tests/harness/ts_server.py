"""Start and stop a private TorchServe: own working dir and TMPDIR, free loopback ports, token auth on.

Used by the end-to-end tests and the serving benchmark, so neither collides with a TorchServe
already running from scripts/serve.sh (which owns $TMPDIR/.model_server.pid and port 9000's socket).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
PORT_KEYS = ("inference_address", "management_address", "metrics_address")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PortCollision(RuntimeError):
    """Another process bound one of the ports between choosing it and TorchServe binding it."""


class TorchServe:
    """``with TorchServe(model_store, ["resnet50.mar"]) as server: server.predict_url("resnet50")``."""

    def __init__(self, model_store: Path, models: list[str], extra_config: dict[str, str] | None = None,
                 startup_timeout: float = 240) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.extra_config = extra_config or {}
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="torchserve-"))
        self.tmpdir = self.workdir / "tmp"
        self.tmpdir.mkdir()
        self.ports = {key: free_port() for key in PORT_KEYS}
        self.grpc_ports = {"grpc_inference_port": free_port(), "grpc_management_port": free_port()}
        self.keys: dict[str, str] = {}
        self.frontend: psutil.Process | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference_address']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management_address']}"

    @property
    def grpc_inference_address(self) -> str:
        return f"127.0.0.1:{self.grpc_ports['grpc_inference_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics_address']}"

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[kind]}"}

    def _write_config(self) -> Path:
        settings: dict[str, str] = {}
        for line in (REPO / "config.properties").read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                settings[key.strip()] = value.strip()
        for key, port in self.ports.items():
            settings[key] = f"http://127.0.0.1:{port}"
        settings["model_store"] = str(self.model_store)
        settings["load_models"] = ",".join(self.models)
        settings.update({key: str(port) for key, port in self.grpc_ports.items()})
        # Worker sockets are Unix sockets named after this port in this server's own TMPDIR: no other server
        # can collide with them, whatever its initial_worker_port.
        settings["initial_worker_port"] = "9000"
        settings.update(self.extra_config)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TMPDIR"] = str(self.tmpdir)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["TEMP"] = str(self.tmpdir)  # torchserve passes it to the JVM as java.io.tmpdir (worker sockets)
        return env

    def start(self, attempts: int = 3) -> TorchServe:
        """Start and wait until every model has a READY worker.

        A free port found by binding and releasing it can be taken by another process before TorchServe binds
        it; such a collision is recognised in TorchServe's log and the start is retried on new ports.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except PortCollision:
                if attempt == attempts:
                    raise
                print(f"TorchServe lost a port race (attempt {attempt}); retrying on new ports", file=sys.stderr)
                self.ports = {key: free_port() for key in PORT_KEYS}
                self.grpc_ports = {key: free_port() for key in self.grpc_ports}
        raise AssertionError("unreachable")

    def _start_once(self) -> TorchServe:
        config = self._write_config()
        self.frontend, self.keys = None, {}
        (self.tmpdir / ".model_server.pid").unlink(missing_ok=True)
        log = (self.workdir / "torchserve.out").open("wb")
        subprocess.run(
            ["torchserve", "--start", "--ts-config", str(config), "--model-store", str(self.model_store), "--ncs"],
            cwd=self.workdir, env=self._env(), stdout=log, stderr=subprocess.STDOUT, check=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._find_frontend()
            if self.frontend is not None and not self.frontend.is_running():
                if "Address already in use" in self._logs_text():
                    self.stop()
                    raise PortCollision()
                raise RuntimeError(f"TorchServe exited during start-up; see {self.workdir}/logs")
            key_file = self.workdir / "key_file.json"
            if key_file.exists():
                try:
                    raw = json.loads(key_file.read_text())
                    self.keys = {kind: raw[kind]["key"] for kind in ("inference", "management", "API")}
                except (ValueError, KeyError):
                    pass
            if self.keys and self._all_models_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"TorchServe did not get ready in {self.startup_timeout:.0f} s; logs kept in {self.workdir}")

    def _logs_text(self) -> str:
        paths = [self.workdir / "torchserve.out", *sorted((self.workdir / "logs").glob("*.log"))]
        return "".join(path.read_text(errors="replace") for path in paths if path.exists())

    def _find_frontend(self) -> None:
        if self.frontend is not None:
            return
        pid_file = self.tmpdir / ".model_server.pid"
        if pid_file.exists():
            try:
                self.frontend = psutil.Process(int(pid_file.read_text().strip()))
            except (ValueError, psutil.NoSuchProcess):
                self.frontend = None

    def _all_models_ready(self) -> bool:
        try:
            for model in self.models:
                name = model.split("=", 1)[0].removesuffix(".mar")
                if self.ready_workers(name) < 1:
                    return False
            return True
        except (requests.RequestException, ValueError, KeyError):
            return False

    def describe(self, model: str) -> dict:
        response = requests.get(f"{self.management_url}/models/{model}", headers=self.headers("management"),
                                timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def ready_workers(self, model: str) -> int:
        return sum(1 for worker in self.describe(model)["workers"] if worker["status"] == "READY")

    def worker_pids(self, model: str) -> list[int]:
        return [int(w["pid"]) for w in self.describe(model)["workers"] if w.get("pid")]

    def scale(self, model: str, workers: int, timeout: float = 240) -> None:
        """Scale synchronously; raise unless ``workers`` workers end up READY.

        TorchServe 0.12 can answer a scale-down with 500 although it did scale: stopping a worker that is
        finishing a batch races in BatchAggregator.sendError (ConcurrentModificationException in ts_log).
        So a 500 is judged by the state it asked for, not by its status alone.
        """
        response = requests.put(
            f"{self.management_url}/models/{model}",
            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
            headers=self.headers("management"), timeout=timeout,
        )
        if response.status_code == 500:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                described = self.describe(model)["workers"]
                if len(described) == workers and self.ready_workers(model) == workers:
                    print(f"TorchServe answered 500 to scaling {model} to {workers} but did scale "
                          f"(its scale-down race); see {self.workdir}/logs/ts_log.log", file=sys.stderr)
                    return
                time.sleep(0.5)
        response.raise_for_status()

    @property
    def frontend_log(self) -> Path:
        """ts_log.log: in Prometheus mode the handler's [METRICS] lines land here too."""
        return self.workdir / "logs" / "ts_log.log"

    def log_position(self) -> int:
        return self.frontend_log.stat().st_size if self.frontend_log.exists() else 0

    def handler_calls(self, since: int) -> list[tuple[str, ...]]:
        """The request ids of every handler call logged after byte offset ``since`` (ids TorchServe also
        returns as the x-request-id header), read from the RequestsPerBatch metric line each call logs.

        TorchServe writes each backend metric line twice; the pair has the same timestamp and ids.
        """
        with self.frontend_log.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        lines = re.findall(r"result=\[METRICS\]RequestsPerBatch\.\w+:[0-9.]+\|\S*?#hostname:[^,]*,(\d+,[0-9a-f,-]+)",
                           text)
        return [tuple(line.strip(",").split(",")[1:]) for line in dict.fromkeys(lines)]

    def requests_per_batch(self, since: int) -> list[int]:
        return [len(ids) for ids in self.handler_calls(since)]

    def processes(self) -> list[psutil.Process]:
        """The frontend and every process it started (the Python backend workers)."""
        if self.frontend is None or not self.frontend.is_running():
            return []
        try:
            return [self.frontend, *self.frontend.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> None:
        processes = self.processes()
        subprocess.run(["torchserve", "--stop"], cwd=self.workdir, env=self._env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.frontend = None

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if exc_info[0] is None:
            self.cleanup()
