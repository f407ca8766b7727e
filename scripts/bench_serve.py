#!/usr/bin/env python3
"""End to end through TorchServe's REST API: the stock image_classifier against ours, same weights, same images.

One private TorchServe (own ports, token auth on) serves, built from the same ResNet-50 weights:
  resnet50_stock   TorchServe's stock image_classifier handler (one image per request)
  resnet50         ours: many images per multipart request (fields image0..imageN)
  resnet50_fanout  the same archive sent N concurrent one-image requests, exactly like the stock one
  resnet50_recipe  ours with decode_strategy: dataloader (a DataLoader per request), unless --no-recipe
A "request of N images" is one multipart request for ours, and N concurrent one-image requests for the
stock handler and resnet50_fanout (TorchServe batches them with the same batchSize); the summary takes
ours at its faster transport and says which. Several client concurrencies; per
request p50/p95/p99 latency and images/s. The model-alone throughput (the same forward on random
tensors, same batch and threads, no server) is the ceiling. Top-1 agreement and the max top-5 score
difference between our served answers and the full-decode reference pipeline check accuracy.

    python scripts/bench_serve.py                                # sizes 1/8/32/64, concurrency 1 and 4
    python scripts/bench_serve.py --sets imagenet phone --sizes 32
    python scripts/bench_serve.py --quick                        # < 1 minute once the archives exist
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch
import yaml
from bench_common import (
    DEFAULT_OUT,
    REPO,
    SET_TITLES,
    SETS,
    UNTRAINED_NOTE,
    format_table,
    load_set,
    machine_info,
    model_alone_throughput,
    new_figure,
    percentile,
    save_figure,
    write_json,
)
from reference import reference_tensor
from tqdm import tqdm
from ts_server import TorchServe

from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.model import load_model

OURS, STOCK, RECIPE = "resnet50", "resnet50_stock", "resnet50_recipe"
# Our archive driven like the stock one: N concurrent one-image requests (TorchServe batches them). For big
# photos this transport is faster than one multipart request, whose ~100 MB body the frontend parses slowly.
OURS_FANOUT = "resnet50_fanout"
TARGET_OVER_STOCK = {"imagenet": 1.4, "phone": 1.8}
TARGET_OF_MODEL_ALONE = 0.90
LOCAL = threading.local()


@dataclass
class Cell:
    """The measurements of one (set, model, images per request, concurrency) combination."""

    latencies: list[float] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    wall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, latency: float, images: int, ok: bool) -> None:
        with self.lock:
            self.latencies.append(latency)
            if ok:
                self.images += images
            else:
                self.errors += 1


def session() -> requests.Session:
    """One keep-alive session per client thread."""
    if not hasattr(LOCAL, "session"):
        LOCAL.session = requests.Session()
    return LOCAL.session


def ensure_archives(store: Path, with_recipe: bool) -> list[str]:
    """Build the archives into ``store`` unless they are already there; all share build_mar's weights."""
    store.mkdir(parents=True, exist_ok=True)
    build = [sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(store)]
    if not ((store / f"{OURS}.mar").exists() and (store / f"{STOCK}.mar").exists()):
        subprocess.run([*build, "--stock"], check=True, capture_output=True)
    archives = [f"{OURS}.mar", f"{STOCK}.mar"]
    if with_recipe:
        if not (store / f"{RECIPE}.mar").exists():
            with tempfile.TemporaryDirectory() as tmp:
                config = Path(tmp) / "recipe-config.yaml"
                settings = yaml.safe_load((REPO / "model-config.yaml").read_text())
                settings.setdefault("handler", {}).update({"decode_strategy": "dataloader"})
                config.write_text(yaml.safe_dump(settings))
                subprocess.run([*build, "--model-name", RECIPE, "--config", str(config)], check=True,
                               capture_output=True)
        archives.append(f"{RECIPE}.mar")
    return archives


def load_served_model(mar: Path) -> tuple[HandlerConfig, torch.nn.Module]:
    """The handler settings and the model exactly as packed in our archive."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp)
        config = HandlerConfig.from_model_yaml(yaml.safe_load((Path(tmp) / "model-config.yaml").read_text()))
        model = load_model(config, Path(tmp) / f"{OURS}.pt", torch.device("cpu"))
    return config, model


def multipart_request(url: str, headers: dict[str, str], images: Sequence[bytes]) -> tuple[bool, list]:
    files = {f"image{i}": (f"image{i}", payload, "application/octet-stream") for i, payload in enumerate(images)}
    response = session().post(url, files=files, headers=headers, timeout=600)
    body = response.json() if response.ok else []
    return response.ok and isinstance(body, list) and len(body) == len(images), body


def fan_out_request(url: str, headers: dict[str, str], images: Sequence[bytes], pool: ThreadPoolExecutor) -> bool:
    """The stock way to send N images: N concurrent one-image requests."""
    futures = [pool.submit(lambda p: session().put(url, data=p, headers=headers, timeout=600).ok, payload)
               for payload in images]
    return all(future.result() for future in futures)


def request_images(images: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The images of request ``index``: consecutive corpus images, wrapping around; the same for every model."""
    return [images[(index * size + j) % len(images)] for j in range(size)]


def run_cell(send: Callable[[list[bytes]], bool], images: Sequence[bytes], size: int, concurrency: int,
             total: int, max_seconds: float, progress: tqdm) -> Cell:
    """``concurrency`` client threads send ``total`` requests of ``size`` images (stopping at ``max_seconds``)."""
    cell = Cell()
    counter = iter(range(total))
    counter_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with counter_lock:
                index = next(counter, None)
            if index is None:
                return
            batch = request_images(images, index, size)
            started = time.perf_counter()
            try:
                ok = send(batch)
            except (requests.RequestException, ValueError):
                ok = False
            cell.add(time.perf_counter() - started, size, ok)
            progress.update(1)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max_seconds + 900)
    cell.wall_s = time.perf_counter() - started
    return cell


def cell_row(set_name: str, model: str, size: int, concurrency: int, cell: Cell) -> dict[str, Any]:
    latencies_ms = [1e3 * s for s in cell.latencies]
    return {
        "set": set_name, "model": model, "images_per_request": size, "concurrency": concurrency,
        "requests": len(cell.latencies), "images": cell.images, "errors": cell.errors, "wall_s": cell.wall_s,
        "images_per_s": cell.images / cell.wall_s if cell.wall_s else 0.0,
        "p50_ms": percentile(latencies_ms, 50), "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99),
    }


def senders(server: TorchServe, models: Sequence[str], pool: ThreadPoolExecutor) -> dict[str, Callable]:
    headers = server.headers()
    result: dict[str, Callable[[list[bytes]], bool]] = {}
    for model in models:
        url = f"{server.inference_url}/predictions/{model}"
        if model == OURS_FANOUT:
            url = f"{server.inference_url}/predictions/{OURS}"
        if model in (STOCK, OURS_FANOUT):
            result[model] = lambda batch, url=url: fan_out_request(url, headers, batch, pool)
        else:
            result[model] = lambda batch, url=url: multipart_request(url, headers, batch)[0]
    return result


def benchmark(server: TorchServe, models: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = [(s, size, c, m) for s in args.sets for size in args.sizes for c in args.concurrency for m in models]
    totals = {size: max(args.requests, math.ceil(args.min_images / size)) for size in args.sizes}
    rows = []
    pool_size = min(512, max(args.sizes) * max(args.concurrency))
    with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="fan-out") as pool:
        send = senders(server, models, pool)
        total_requests = sum(totals[size] + 1 for _, size, _, _ in plan)
        with tqdm(total=total_requests, desc="serve", unit="req", dynamic_ncols=True) as progress:
            for set_name, size, concurrency, model in plan:
                images = load_set(set_name)
                progress.set_postfix_str(f"{set_name} {model} {size} img x{concurrency}")
                run_cell(send[model], images, size, 1, 1, args.max_seconds, progress)  # warm-up, not counted
                cell = run_cell(send[model], images, size, concurrency, totals[size], args.max_seconds, progress)
                rows.append(cell_row(set_name, model, size, concurrency, cell))
    return rows


def model_alone(model: torch.nn.Module, config: HandlerConfig, sizes: Sequence[int],
                quick: bool) -> list[dict[str, Any]]:
    batches = sorted({min(size, config.max_batch) for size in sizes})
    return [model_alone_throughput(model, batch, config.intra_op_threads, torch.device("cpu"),
                                   repeats=2 if quick else 5, channels_last=config.channels_last)
            for batch in batches]


def engine_breakdown(model: torch.nn.Module, config: HandlerConfig, set_names: Sequence[str],
                     sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Where the time goes without HTTP: our engine in this process, split into decode wait and model time."""
    torch.set_num_threads(config.intra_op_threads)
    engine = InferenceEngine(config, model, torch.device("cpu"))
    rows = []
    try:
        for set_name, size in ((s, n) for s in set_names for n in sizes):
            images = load_set(set_name, size)
            engine.predict(images)  # warm-up
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                engine.predict(images)
                runs.append((time.perf_counter() - started, engine.last_timings))
            wall, timings = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
            rows.append({"set": set_name, "images": size, "wall_s": wall, "images_per_s": size / wall,
                         "decode_wait_s": timings.decode_wait, "model_s": timings.inference,
                         "other_s": wall - timings.decode_wait - timings.inference})
    finally:
        engine.close()
    return rows


def summarize_runs(rows: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]],
                   max_batch: int) -> list[dict[str, Any]]:
    """Per set and request size, at each model's best concurrency: ours against stock and the model alone."""
    ceiling = {entry["batch"]: entry["images_per_s"] for entry in alone}
    summary = []
    for set_name, size in sorted({(r["set"], r["images_per_request"]) for r in rows}):
        best = {}
        for model in (OURS, STOCK, RECIPE):
            variants = (OURS, OURS_FANOUT) if model == OURS else (model,)  # ours: its faster transport
            candidates = [r for r in rows if r["set"] == set_name and r["images_per_request"] == size
                          and r["model"] in variants and r["images_per_s"] > 0]
            if candidates:
                best[model] = max(candidates, key=lambda r: r["images_per_s"])
        if OURS not in best:
            continue
        ours = best[OURS]["images_per_s"]
        alone_ips = ceiling.get(min(size, max_batch))
        entry: dict[str, Any] = {"set": set_name, "images_per_request": size, "ours_images_per_s": ours,
                                 "ours_concurrency": best[OURS]["concurrency"], "model_alone_images_per_s": alone_ips,
                                 "ours_transport": "one image per request" if best[OURS]["model"] == OURS_FANOUT
                                 else "multipart"}
        if alone_ips:
            entry["ours_of_model_alone"] = ours / alone_ips
            entry["meets_model_alone_target"] = entry["ours_of_model_alone"] >= TARGET_OF_MODEL_ALONE
        if STOCK in best:
            entry["stock_images_per_s"] = best[STOCK]["images_per_s"]
            entry["ours_over_stock"] = ours / best[STOCK]["images_per_s"]
            if set_name in TARGET_OVER_STOCK:
                entry["target_over_stock"] = TARGET_OVER_STOCK[set_name]
                entry["meets_stock_target"] = entry["ours_over_stock"] >= TARGET_OVER_STOCK[set_name]
        if RECIPE in best:
            entry["recipe_images_per_s"] = best[RECIPE]["images_per_s"]
            entry["ours_over_recipe"] = ours / best[RECIPE]["images_per_s"]
        summary.append(entry)
    return summary


def served_top5(server: TorchServe, images: Sequence[bytes], chunk: int = 32) -> list[list[tuple[int, float]]]:
    url = f"{server.inference_url}/predictions/{OURS}"
    answers = []
    for start in range(0, len(images), chunk):
        ok, body = multipart_request(url, server.headers(), images[start:start + chunk])
        if not ok:
            raise RuntimeError(f"our model failed on the accuracy corpus: {body}")
        answers += [[(item["index"], item["score"]) for item in entry["topk"]] for entry in body]
    return answers


def reference_top5(model: torch.nn.Module, images: Sequence[bytes], chunk: int = 16) -> list[list[tuple[int, float]]]:
    result = []
    for start in range(0, len(images), chunk):
        batch = torch.stack([reference_tensor(payload) for payload in images[start:start + chunk]])
        with torch.inference_mode():
            scores, indices = torch.softmax(model(batch), dim=1).topk(5, dim=1)
        result += [list(zip(i.tolist(), s.tolist(), strict=True)) for s, i in zip(scores, indices, strict=True)]
    return result


def accuracy(server: TorchServe, model: torch.nn.Module, set_names: Sequence[str], count: int) -> list[dict]:
    """Our served answers against the full-decode reference pipeline with the same weights."""
    result = []
    for set_name in set_names:
        images = load_set(set_name)[:count]
        ours, reference = served_top5(server, images), reference_top5(model, images)
        top1 = sum(o[0][0] == r[0][0] for o, r in zip(ours, reference, strict=True))
        top5_sets = sum({i for i, _ in o} == {i for i, _ in r} for o, r in zip(ours, reference, strict=True))
        score_diff = max(abs(a[1] - b[1]) for o, r in zip(ours, reference, strict=True)
                         for a, b in zip(o, r, strict=True))
        result.append({"set": set_name, "images": len(images), "top1_agreement": top1 / len(images),
                       "top5_set_agreement": top5_sets / len(images), "max_top5_score_diff": score_diff})
    return result


def plot(rows: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]], max_batch: int, path: Path) -> Path:
    set_names = list(dict.fromkeys(r["set"] for r in rows))
    figure, axes = new_figure(2, len(set_names), height=6.0)
    ceiling = {entry["batch"]: entry["images_per_s"] for entry in alone}
    styles = {OURS: ("tab:green", "ours (multipart)"), OURS_FANOUT: ("tab:olive", "ours (one image per request)"),
              STOCK: ("tab:red", "stock image_classifier"),
              RECIPE: ("tab:blue", "recipe (DataLoader per request)")}
    for (throughput_axis, latency_axis), set_name in zip(axes, set_names, strict=True):
        for model, (color, name) in styles.items():
            for concurrency, marker in zip(sorted({r["concurrency"] for r in rows}), "os^vD", strict=False):
                points = sorted((r["images_per_request"], r["images_per_s"], r["p50_ms"], r["p95_ms"]) for r in rows
                                if r["set"] == set_name and r["model"] == model and r["concurrency"] == concurrency)
                if not points:
                    continue
                sizes = [p[0] for p in points]
                label = f"{name}, {concurrency} client(s)"
                throughput_axis.plot(sizes, [p[1] for p in points], marker=marker, color=color, label=label)
                latency_axis.plot(sizes, [p[3] for p in points], marker=marker, color=color, label=f"{label} p95")
        sizes = sorted({r["images_per_request"] for r in rows if r["set"] == set_name})
        throughput_axis.plot(sizes, [ceiling.get(min(s, max_batch), float("nan")) for s in sizes], "k--",
                             marker="_", markersize=30, label="model alone (random tensors)")
        for axis, ylabel in ((throughput_axis, "images/s (higher is better)"),
                             (latency_axis, "p95 latency per request, ms (log)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("images per request")
            axis.set_ylabel(ylabel)
            axis.set_title(SET_TITLES.get(set_name, set_name), fontsize=10)
            axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        latency_axis.set_yscale("log")
        throughput_axis.set_ylim(bottom=0)
    return save_figure(figure, path)


def report(rows, alone, summary, agreement) -> str:
    parts = [format_table(rows, [("set", "set"), ("model", "model"), ("images_per_request", "img/req"),
                                 ("concurrency", "clients"), ("requests", "requests"), ("errors", "errors"),
                                 ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
                                 ("images_per_s", "images/s")]),
             format_table(alone, [("batch", "model-alone batch"), ("threads", "torch threads"),
                                  ("median_s", "median s"), ("spread_pct", "IQR %"), ("images_per_s", "images/s")])]
    if summary:
        parts.append(format_table(summary, [
            ("set", "set"), ("images_per_request", "img/req"), ("ours_images_per_s", "ours img/s"),
            ("ours_transport", "ours sent as"), ("stock_images_per_s", "stock img/s"),
            ("ours_over_stock", "ours/stock"), ("target_over_stock", "target"), ("recipe_images_per_s", "recipe img/s"),
            ("model_alone_images_per_s", "model alone"), ("ours_of_model_alone", "ours/alone")]))
    if agreement:
        parts.append(format_table(agreement, [("set", "set"), ("images", "images"), ("top1_agreement", "top-1 agree"),
                                              ("top5_set_agreement", "top-5 set agree"),
                                              ("max_top5_score_diff", "max top-5 score diff")]))
        parts.append(f"note: {UNTRAINED_NOTE}")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=[s for s in SETS if s != "mixed"], default=["imagenet", "phone"],
                        help="corpus sets to serve (the stock handler cannot read the mixed set)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 8, 32, 64], help="images per request")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="timed requests per case, at least")
    parser.add_argument("--min-images", type=int, default=128, help="timed images per case, at least")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="stop a case's requests after this long")
    parser.add_argument("--no-recipe", dest="recipe", action="store_false",
                        help="skip the DataLoader-per-request variant of our handler")
    parser.add_argument("--accuracy-images", type=int, default=64,
                        help="images per set (imagenet, phone, mixed) checked against the reference (0: skip)")
    parser.add_argument("--model-store", type=Path, help="reuse/build the archives here (default OUT/model_store)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run for the tests: imagenet, 8 images per request, 2 clients, no recipe")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.sizes, args.concurrency = ["imagenet"], [8], [2]
        args.requests, args.min_images, args.max_seconds, args.recipe, args.accuracy_images = 2, 0, 20.0, False, 4
    if min(args.sizes) < 1 or min(args.concurrency) < 1 or args.requests < 1:
        parser.error("sizes, concurrency and requests must be at least 1")
    args.model_store = args.model_store or args.out / "model_store"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()  # the date is when the run started
    archives = ensure_archives(args.model_store, args.recipe)
    config, model = load_served_model(args.model_store / f"{OURS}.mar")
    alone = model_alone(model, config, args.sizes, args.quick)
    breakdown = engine_breakdown(model, config, args.sets, [max(args.sizes)], 1 if args.quick else 3)
    models = [name.removesuffix(".mar") for name in archives]
    models.insert(models.index(OURS) + 1, OURS_FANOUT)
    # A private server (own ports, TMPDIR and worker sockets); its logs are kept only if something fails.
    with TorchServe(args.model_store, archives, extra_config={"job_queue_size": "1000"}) as server:
        rows = benchmark(server, models, args)
        sets = ["imagenet", "phone", "mixed"] if not args.quick else ["imagenet", "mixed"]
        agreement = accuracy(server, model, sets, args.accuracy_images) if args.accuracy_images else []
    summary = summarize_runs(rows, alone, config.max_batch)
    result = {
        "benchmark": "serve", "machine": machine, "settings": {k: v for k, v in vars(args).items()},
        "handler": {"max_batch": config.max_batch, "decode_threads": config.pool_size,
                    "torch_threads": config.intra_op_threads, "decode_strategy": config.decode_strategy},
        "model_alone": alone, "engine_in_process": breakdown, "results": rows, "summary": summary,
        "accuracy": agreement,
        "notes": [UNTRAINED_NOTE, "summary: each model at its best client concurrency",
                  "client and server share this machine's cores"],
    }
    json_path = write_json(args.out / "bench_serve.json", result)
    png_path = plot(rows, alone, config.max_batch, args.out / "bench_serve.png")
    print(report(rows, alone, summary, agreement))
    print("\nour engine in this process, no HTTP (where the time goes):\n" + format_table(breakdown, [
        ("set", "set"), ("images", "images"), ("wall_s", "wall s"), ("decode_wait_s", "waiting for decode s"),
        ("model_s", "copy+normalize+model s"), ("other_s", "other s"), ("images_per_s", "images/s")]))
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
