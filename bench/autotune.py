#!/usr/bin/env python3
"""Find the decode pool size x max batch (x workers) (x model step: backend, precision) that gives the most
images/s under a latency bound.

Runs our engine in this process with the weights and settings packed in the .mar (no HTTP; by default the
trained demo, model_store/efficientnet_lite0.mar), on the corpus photos, for every combination of the sweep:
W workers are emulated by W engines called from W client threads, with torch threads and decode threads
divided among them as the handler does. The winner is the highest throughput whose p95 latency per request
stays under --latency-bound-ms; the script explains the choice and prints the model-config.yaml settings to
use. It also sizes TorchServe's queue (jobQueueSize) for --queue-budget-s: the chosen setting is timed once
more on handler calls of batchSize images (what a call holds when one-image requests pile up), and the queue
holds what that rate answers within the budget. With --write FILE it also updates those settings in FILE,
keeping the rest of the file (comments included) as it is. --quick is a smoke run: it chooses nothing and
refuses --write.

Each --backends x --precisions pair is chosen as the server chooses it (handler.backends: the archive's gate
photos, its fallbacks): the table shows the step that actually ran, so a precision refused by the accuracy gate
or a backend missing here shows up as the fallback that served instead.

    python bench/autotune.py                                   # the demo archive, ~1 minute on 2 cores
    python bench/autotune.py --workers 1 2 --latency-bound-ms 3000 --write model-config.yaml
    python bench/autotune.py --backends eager openvino inductor --precisions fp32 bf16 --max-batch 16
    python bench/autotune.py --quick                           # a smoke run (seconds) that recommends nothing
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # importing torch takes seconds: say so first
    print(f"{Path(__file__).name}: loading torch, timm and the handler ...", file=sys.stderr, flush=True)

import argparse
import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from bench_common import (
    DEFAULT_OUT,
    REPO,
    SETS,
    SMOKE_NOTICE,
    ServedArchive,
    ensure_corpus,
    format_table,
    load_set,
    machine_info,
    percentile,
    served_engine,
    step,
    unpack_archive,
    write_json,
)
from build_mar import DEMO_MODEL_NAME
from tqdm import tqdm

from handler.config import BACKENDS, PRECISIONS, HandlerConfig
from handler.engine import InferenceEngine

CPU = torch.device("cpu")


def engines_for(archive: ServedArchive, config: HandlerConfig, workers: int) -> tuple[list[InferenceEngine], str]:
    """``workers`` engines, each serving the model step the server would choose for ``config``, warmed up."""
    engines, chosen = [], ""
    for _ in range(workers):
        engine, choice = served_engine(archive, config)
        engines.append(engine)
        chosen = choice.describe()
    return engines, chosen


def measure(archive: ServedArchive, workers: int, threads: int, max_batch: int, backend: str, precision: str,
            images: Sequence[bytes], requests: int, max_seconds: float) -> dict[str, Any]:
    """Throughput and latency of ``workers`` engines each serving ``requests`` requests of ``images``."""
    config = dataclasses.replace(archive.config, decode_threads=threads, max_batch=max_batch, max_workers=workers,
                                 warmup=False, backend=backend, precision=precision)
    torch.set_num_threads(config.intra_op_threads)
    engines, chosen = engines_for(archive, config, workers)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker(engine: InferenceEngine) -> None:
        for index in range(requests):
            if index > 0 and time.monotonic() > deadline:
                return
            started = time.perf_counter()
            engine.predict(images)
            with lock:
                latencies.append(time.perf_counter() - started)

    try:
        engines[0].predict(images[: min(len(images), max_batch)])  # warm-up, not counted
        started = time.perf_counter()
        clients = [threading.Thread(target=worker, args=(engine,)) for engine in engines]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall = time.perf_counter() - started
    finally:
        for engine in engines:
            engine.close()
    latencies_ms = [1e3 * s for s in latencies]
    return {"workers": workers, "decode_threads": threads, "max_batch": max_batch,
            "backend": backend, "precision": precision, "served": engines[0].step.describe(), "choice": chosen,
            "torch_threads": config.intra_op_threads, "requests": len(latencies),
            "images_per_s": len(latencies) * len(images) / wall, "p50_ms": percentile(latencies_ms, 50),
            "p95_ms": percentile(latencies_ms, 95)}


def choose(rows: Sequence[dict[str, Any]], bound_ms: float) -> tuple[dict[str, Any], str]:
    """The most images/s within the latency bound (fewer threads on a tie); else the lowest p95."""
    within = [r for r in rows if r["p95_ms"] <= bound_ms]
    if not within:
        best = min(rows, key=lambda r: r["p95_ms"])
        return best, (f"no setting keeps p95 under {bound_ms:.0f} ms; the lowest p95 is {best['p95_ms']:.0f} ms "
                      f"({best['images_per_s']:.1f} images/s): raise the bound or send fewer images per request")
    best = max(within, key=lambda r: (round(r["images_per_s"], 1), -r["decode_threads"] * r["workers"]))
    runner_up = sorted(within, key=lambda r: r["images_per_s"], reverse=True)[1:2]
    why = (f"{best['images_per_s']:.1f} images/s at p95 {best['p95_ms']:.0f} ms (bound {bound_ms:.0f} ms): "
           f"the highest throughput of the {len(within)} of {len(rows)} settings within the bound")
    if runner_up:
        other = runner_up[0]
        why += (f"; next best: workers={other['workers']} decode_threads={other['decode_threads']} "
                f"max_batch={other['max_batch']} {other['served']} at {other['images_per_s']:.1f} images/s")
    return best, why


def queue_size_for(one_image_requests_per_s: float, budget_s: float) -> int:
    """jobQueueSize: the requests the server answers within ``budget_s`` (at least 1; the last in waits that long)."""
    return max(1, int(one_image_requests_per_s * budget_s))


def settings_for(best: dict[str, Any], queue_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """(top-level frontend settings, handler settings) to write into model-config.yaml."""
    return ({"minWorkers": best["workers"], "maxWorkers": best["workers"], "jobQueueSize": queue_size},
            {"decode_threads": best["decode_threads"], "max_batch": best["max_batch"], "backend": best["backend"],
             "precision": best["precision"]})


def settings_yaml(top: dict[str, int], handler: dict[str, int]) -> str:
    return yaml.safe_dump({**top, "handler": handler}, sort_keys=False)


def update_model_config(text: str, top: dict[str, int], handler: dict[str, int]) -> str:
    """Set the values in a model-config.yaml text, keeping its comments and everything else."""
    lines = text.splitlines()
    for key, value in top.items():
        if not _replace_value(lines, 0, len(lines), "", key, value):
            position = next((i for i, line in enumerate(lines) if re.match(r"^handler:", line)), len(lines))
            lines.insert(position, f"{key}: {value}")
    start = next((i for i, line in enumerate(lines) if re.match(r"^handler:\s*(#.*)?$", line)), None)
    if start is None:
        lines += ["handler:", *(f"  {key}: {value}" for key, value in handler.items())]
        return "\n".join(lines) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()),
               len(lines))
    indent = next((re.match(r"^(\s+)", lines[i]).group(1) for i in range(start + 1, end)
                   if lines[i].strip() and re.match(r"^\s+", lines[i])), "  ")
    for key, value in handler.items():
        if not _replace_value(lines, start + 1, end, indent, key, value):
            lines.insert(start + 1, f"{indent}{key}: {value}")
            end += 1
    return "\n".join(lines) + "\n"


def _replace_value(lines: list[str], start: int, end: int, indent: str, key: str, value: int) -> bool:
    pattern = re.compile(rf"^({re.escape(indent)}{re.escape(key)}:\s*)([^#]*?)(\s*#.*)?$")
    for index in range(start, end):
        match = pattern.match(lines[index])
        if match:
            lines[index] = f"{match.group(1)}{value}{match.group(3) or ''}"
            return True
    return False


def write_settings(path: Path, top: dict[str, int], handler: dict[str, int]) -> None:
    """Update ``path`` only if the result is still a valid configuration."""
    updated = update_model_config(path.read_text(), top, handler)
    HandlerConfig.from_model_yaml(yaml.safe_load(updated))
    path.write_text(updated)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mar", type=Path, default=REPO / "model_store" / f"{DEMO_MODEL_NAME}.mar",
                        help="our archive (scripts/build_mar.py builds it; default: the demo's)")
    parser.add_argument("--set", default="imagenet", choices=SETS, help="corpus set the requests carry")
    parser.add_argument("--images-per-request", type=int, default=32)
    parser.add_argument("--decode-threads", nargs="+", type=int, default=[1, 2, 4], help="pool sizes to try")
    parser.add_argument("--max-batch", nargs="+", type=int, default=[8, 16, 32], help="max_batch values to try")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["auto"],
                        help="model step backends to try (auto: what the server picks here)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["auto"],
                        help="precisions to try; a reduced one serves only if it passes the accuracy gate")
    parser.add_argument("--workers", nargs="+", type=int, default=[1],
                        help="TorchServe workers to emulate (cores are divided among them)")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per worker and setting")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop a setting's requests after this long")
    parser.add_argument("--latency-bound-ms", type=float, default=5000.0,
                        help="p95 latency per request that the chosen setting must keep")
    parser.add_argument("--queue-budget-s", type=float, default=10.0,
                        help="seconds a one-image request may wait in a full queue: sizes jobQueueSize (past it "
                             "TorchServe answers 503 at once)")
    parser.add_argument("--write", type=Path, metavar="MODEL_CONFIG_YAML",
                        help="update these settings in this model-config.yaml (otherwise only print them)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for autotune.json")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (a tiny sweep, seconds) for the tests: chooses nothing, refuses --write")
    args = parser.parse_args(argv)
    if args.quick and args.write:
        parser.error("--write cannot be used with --quick: a smoke run's numbers choose nothing. Run without "
                     "--quick to choose and write settings (narrow the sweep with --decode-threads and --max-batch)")
    if args.quick:
        args.decode_threads, args.max_batch, args.workers = [1, 2], [4], [1]
        args.images_per_request, args.requests, args.max_seconds = 4, 1, 10.0
    if not args.mar.exists():
        parser.error(f"{args.mar} does not exist: build it with scripts/build_mar.py, or pass --mar")
    if min(args.decode_threads + args.max_batch + args.workers) < 1 or args.images_per_request < 1:
        parser.error("decode threads, max batch, workers and images per request must be at least 1")
    if args.queue_budget_s <= 0:
        parser.error("--queue-budget-s must be more than 0 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        print(SMOKE_NOTICE, flush=True)
    machine = machine_info()  # the date is when the run started
    ensure_corpus()
    with step(f"loading the model and settings from {args.mar.name}", expected_s=5):
        archive = unpack_archive(args.mar)
    images = load_set(args.set, args.images_per_request)
    plan = [(w, t, b, backend, precision) for w in args.workers for t in args.decode_threads for b in args.max_batch
            for backend in args.backends for precision in args.precisions]
    rows = [measure(archive, w, t, b, backend, precision, images, args.requests, args.max_seconds)
            for w, t, b, backend, precision in tqdm(plan, desc="timing settings", unit="setting", dynamic_ncols=True)]
    result: dict[str, Any] = {"benchmark": "autotune", "quick": args.quick, "machine": machine, "mar": str(args.mar),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "results": rows}
    print()
    print(format_table(rows, [
        ("workers", "workers", "TorchServe workers emulated (engines called at the same time)"),
        ("decode_threads", "decode threads", "decode pool size per worker"),
        ("max_batch", "max batch", "images per model forward"),
        ("served", "model step", "the backend and precision that served (after the gate and any fallback)"),
        ("torch_threads", "torch threads", "per worker: the cores divided among the workers"),
        ("requests", "requests", f"timed requests of {args.images_per_request} {args.set} images, all workers"),
        ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms", "p50, p95: percentiles of the time per request"),
        ("images_per_s", "images/s", "images answered / wall time, all workers together")]))
    if args.quick:
        result["notice"] = SMOKE_NOTICE
        json_path = write_json(args.out / "autotune.json", result)
        print(f"\nwrote {json_path}\n{SMOKE_NOTICE}")
        return
    best, why = choose(rows, args.latency_bound_ms)
    batch_size = int(archive.model_yaml.get("batchSize", 1))
    with step(f"timing the chosen setting on calls of {batch_size} one-image requests (batchSize), for the queue",
              expected_s=5):
        calls = measure(archive, best["workers"], best["decode_threads"], best["max_batch"], best["backend"],
                        best["precision"], load_set(args.set, batch_size), args.requests * 2, args.max_seconds)
    queue_size = queue_size_for(calls["images_per_s"], args.queue_budget_s)
    queue_why = (f"jobQueueSize {queue_size}: {calls['images_per_s']:.1f} one-image requests/s (handler calls of "
                 f"{batch_size}) x the {args.queue_budget_s:g} s budget; TorchServe's frontend adds its own time, "
                 "so check it with a burst (docs/benchmarks.md, \"Bursts\")")
    top, handler = settings_for(best, queue_size)
    result.update({"best": best, "why": why, "one_image_calls": calls, "queue_why": queue_why,
                   "model_config": {**top, "handler": handler}})
    json_path = write_json(args.out / "autotune.json", result)
    print(f"\nchosen: {why}\n{queue_why}\n\nmodel-config.yaml settings to use (the rest of the handler section "
          "stays):\n")
    print(settings_yaml(top, handler))
    if args.write:
        write_settings(args.write, top, handler)
        print(f"updated {args.write}")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
