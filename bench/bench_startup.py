#!/usr/bin/env python3
"""Start-up time of a TorchServe worker with the model step's caches cold and warm, and a killed worker's recovery.

A private TorchServe (own ports, token auth on) serves the demo archive three times in a row:
  cold      an empty cache_dir (XDG_CACHE_HOME points at a new folder): OpenVINO converts, inductor compiles
  warm      the same folder again: the converted model and compiled code are read back
  killed    the warm worker is killed (SIGKILL); TorchServe starts a new one: the time until it is READY and
            until a request answers 200
Each time is from `torchserve --start` (or the kill) to the model's first READY worker, and the worker's own
log line says which model step it chose and how long its warm-up took.

    python bench/bench_startup.py                       # the demo archive (built when missing), ~2 minutes
    python bench/bench_startup.py --mar model_store/resnet50.mar
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from bench_common import DEFAULT_OUT, REPO, load_set, machine_info, write_json
from build_mar import DEMO_MODEL_NAME

from tests.harness.ts_server import TorchServe

WORKER_PREFIX = re.compile(r"^.*?(?=model step|warmed up)")


def worker_lines(server: TorchServe) -> list[str]:
    log = server.workdir / "logs" / "model_log.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line.split(" - ", 1)[-1] for line in text.splitlines()
            if " model step: " in line or "warmed up batch sizes" in line]


def timed_start(store: Path, mar: str, cache_home: Path) -> tuple[TorchServe, float]:
    os.environ["XDG_CACHE_HOME"] = str(cache_home)  # the worker's default cache_dir lives under it
    server = TorchServe(store, [mar])
    started = time.monotonic()
    server.start()
    return server, time.monotonic() - started


def answer(server: TorchServe, model: str, photo: bytes) -> int:
    response = requests.put(f"{server.inference_url}/predictions/{model}", data=photo,
                            headers=server.headers(), timeout=120)
    return response.status_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mar", type=Path, help=f"an archive (default: the demo, {DEMO_MODEL_NAME}.mar, built "
                                                 f"into a temporary store)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    machine = machine_info()
    photo = load_set("imagenet", 1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.mar is None:
            store = Path(tmp) / "store"
            subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(store),
                            "--skip-step-check"], check=True, capture_output=True)
            mar = f"{DEMO_MODEL_NAME}.mar"
        else:
            store, mar = args.mar.resolve().parent, args.mar.name
        model = mar.removesuffix(".mar")
        cache_home = Path(tmp) / "cache"
        for label in ("cold", "warm"):
            server, seconds = timed_start(store, mar, cache_home)
            try:
                status = answer(server, model, photo)
                rows.append({"start": label, "ready_s": seconds, "first_answer": status,
                             "worker_log": worker_lines(server)})
                print(f"{label}: ready in {seconds:.1f} s, first request {status}", flush=True)
                if label == "warm":
                    victim = server.worker_pids(model)[0]
                    killed = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    while not (server.ready_workers(model) >= 1 and victim not in server.worker_pids(model)):
                        time.sleep(0.2)
                    ready = time.monotonic() - killed
                    while answer(server, model, photo) != 200:
                        time.sleep(0.2)
                    answered = time.monotonic() - killed
                    rows.append({"start": "killed worker", "ready_s": ready, "answered_s": answered,
                                 "worker_log": worker_lines(server)[-2:]})
                    print(f"killed worker: ready again in {ready:.1f} s, answering in {answered:.1f} s", flush=True)
            finally:
                server.stop()
                server.cleanup()
    for row in rows:
        for line in row["worker_log"][-2:]:
            print(f"  {row['start']}: {re.sub(WORKER_PREFIX, '', line)}")
    path = write_json(args.out / "bench_startup.json", {"benchmark": "startup", "machine": machine, "mar": mar,
                                                        "results": rows})
    print(f"wrote {path}")
    print(json.dumps([{k: v for k, v in row.items() if k != "worker_log"} for row in rows]))


if __name__ == "__main__":
    main()
