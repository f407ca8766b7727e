#!/usr/bin/env python3
"""Embeddings next to classification, through TorchServe: what asking for an embedding costs.

One private TorchServe (token auth on, free loopback ports) serves the trained demo. The same batch of
ImageNet-size photos is sent as one JSON request asking for ``topk``, for ``embedding``, or for both,
round after round in turn (so machine noise hits all three alike); per output choice: median latency and
images/s. One forward serves every output, so an embedding should cost no more than a classification.

    python bench/bench_outputs.py                   # 32 photos, 9 rounds
    python bench/bench_outputs.py --quick           # a smoke run: 8 photos, 2 rounds; recommends nothing
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from bench_common import DEFAULT_OUT, REPO, format_table, load_set, machine_info, write_json

from tests.harness.ts_server import TorchServe

CHOICES = {"topk": ["topk"], "embedding": ["embedding"], "topk + embedding": ["topk", "embedding"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="photos per request")
    parser.add_argument("--rounds", type=int, default=9, help="timed requests per output choice")
    parser.add_argument("--quick", action="store_true", help="8 photos, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    images, rounds = (8, 2) if args.quick else (args.images, args.rounds)
    from build_mar import DEMO_MODEL_NAME

    photos = load_set("imagenet", images)
    body = {"images": [base64.b64encode(photo).decode() for photo in photos]}
    with tempfile.TemporaryDirectory() as store:
        print("building the demo archive ...", flush=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", store],
                       check=True, capture_output=True)
        print("starting TorchServe (about 20 s) ...", flush=True)
        with TorchServe(Path(store), [f"{DEMO_MODEL_NAME}.mar"]) as server:
            url = f"{server.inference_url}/predictions/{DEMO_MODEL_NAME}"
            samples: dict[str, list[float]] = {name: [] for name in CHOICES}
            with requests.Session() as session:
                for round_number in range(rounds + 1):  # round 0 warms up
                    for name, outputs in CHOICES.items():
                        started = time.perf_counter()
                        response = session.post(url, json={**body, "outputs": outputs}, headers=server.headers(),
                                                timeout=600)
                        elapsed = time.perf_counter() - started
                        entries = response.json()
                        if response.status_code != 200 or any(set(e) != set(outputs) for e in entries):
                            raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
                        if round_number:
                            samples[name].append(elapsed)
                    print(f"round {round_number}/{rounds} done", flush=True)
    rows = [{"outputs": name, "images": images, "rounds": rounds, "p50_ms": 1000 * statistics.median(times),
             "min_ms": 1000 * min(times), "images_per_s": images / statistics.median(times)}
            for name, times in samples.items()]
    base = rows[0]["p50_ms"]
    for row in rows:
        row["time_vs_topk"] = row["p50_ms"] / base
    print()
    print(format_table(rows, [("outputs", "outputs asked for"), ("images", "photos/request"), ("p50_ms", "p50 ms"),
                              ("min_ms", "min ms"), ("images_per_s", "images/s"),
                              ("time_vs_topk", "time / topk-only time")]))
    path = write_json(args.out / "bench_outputs.json", {"machine": machine_info(), "rows": rows, "quick": args.quick})
    if args.quick:
        print(f"\nSMOKE RUN (--quick): too few photos and rounds to compare anything. Results: {path}")
    else:
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
