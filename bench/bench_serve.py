#!/usr/bin/env python3
"""End to end through TorchServe's REST API, on the trained demo (EfficientNet-Lite0): the stock
image_classifier against ours, same weights, same images.

One private TorchServe (own ports, token auth on) serves archives that scripts/build_mar.py builds from the
demo's weights into --model-store (rebuilt only when the handler, the config or the weights changed):
  efficientnet_lite0_stock   TorchServe's stock image_classifier with the model's own transforms (--stock)
  efficientnet_lite0         ours
  efficientnet_lite0_recipe  ours with decode_strategy: dataloader (a DataLoader per request), unless --no-recipe
and sends each request of N images these ways:
  ours                   one multipart request (fields image0..imageN-1) to our archive
  ours OIP               one Open Inference Protocol request, images as binary BYTES (the client's format)
  ours gRPC              the same OIP binary body as one request to TorchServe's gRPC Predictions API
  ours, one per request  N concurrent one-image requests to our archive, exactly as to the stock one
  stock                  N concurrent one-image requests to the stock archive (TorchServe batches them,
                         same batchSize)
  recipe                 one multipart request to the recipe archive
  ours BACKEND PRECISION one multipart request to an archive of ours with that model step (--steps), e.g.
                         --steps eager:fp32 inductor:fp32 to compare backends end to end (the served step is
                         still chosen by the server: a precision its accuracy gate refuses falls back to fp32)
For each client concurrency: p50/p95/p99 time per request and images/s. Also measured: the model alone
(the same forward on random tensors, same batch and torch threads, no server), the ceiling; our engine in
this process without HTTP (decode wait vs model time); and accuracy: our served answers against timm's own
eval pipeline (full decode + timm.data.create_transform) on the same weights: top-1 agreement and the
max / median shift of the reference's top-5 scores.

    python bench/bench_serve.py --sets imagenet phone --sizes 32 --concurrency 1 --no-recipe --requests 8
                                  # one 32-photo request, ours vs stock (~6 minutes on 2 cores)
    python bench/bench_serve.py # sizes 1/8/32/64, 1 and 4 clients, with the recipe (the longest run)
    python bench/bench_serve.py --quick   # a smoke run (~1 minute) that recommends nothing
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # importing torch takes seconds: say so first
    print(f"{Path(__file__).name}: loading torch, timm and the handler ...", file=sys.stderr, flush=True)

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import requests
import torch
import yaml
from bench_common import (
    DEFAULT_OUT,
    REPO,
    SET_TITLES,
    SETS,
    SMOKE_NOTICE,
    drawn_labels,
    ensure_corpus,
    format_table,
    format_value,
    label_bars,
    load_set,
    machine_info,
    model_alone_throughput,
    new_figure,
    percentile,
    save_figure,
    served_engine,
    step,
    unpack_archive,
    write_json,
)
from build_mar import DEMO_MODEL_NAME
from tqdm import tqdm

from handler.config import BACKENDS, PRECISIONS, HandlerConfig
from handler.engine import InferenceEngine
from image_batch_client import oip
from image_batch_client.grpc_transport import GrpcPredictions
from tests.harness.reference import reference_probabilities, timm_transform
from tests.harness.ts_server import TorchServe

OURS = DEMO_MODEL_NAME
STOCK = f"{OURS}_stock"
RECIPE = f"{OURS}_recipe"
LOCAL = threading.local()


@dataclass(frozen=True)
class Method:
    """One way of serving a request of N images: which archive, and how the client sends the images."""

    name: str
    archive: str
    transport: str  # one of TRANSPORTS: N concurrent one-image requests, or one request of N images sent this way
    label: str
    color: str


TRANSPORTS = {"one-image": "one image per request", "multipart": "one multipart request",
              "oip-binary": "one OIP binary request", "grpc": "one gRPC request (OIP binary body)"}


METHODS = (
    Method("ours", OURS, "multipart", "ours, one multipart request", "tab:green"),
    Method("ours_oip", OURS, "oip-binary", "ours, one OIP binary request", "tab:cyan"),
    Method("ours_grpc", OURS, "grpc", "ours, one gRPC request (OIP binary body)", "tab:pink"),
    Method("ours_one_per_request", OURS, "one-image", "ours, N one-image requests", "tab:olive"),
    Method("stock", STOCK, "one-image", "stock image_classifier, N one-image requests", "tab:red"),
    Method("recipe", RECIPE, "multipart", "recipe (DataLoader per request), one multipart request", "tab:blue"),
)
METHOD = {method.name: method for method in METHODS}
OURS_METHODS = ("ours", "ours_oip", "ours_grpc", "ours_one_per_request")


@dataclass
class Cell:
    """The measurements of one (set, method, images per request, concurrency) combination."""

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


def step_method(spec: str) -> Method:
    backend, precision = spec.split(":")
    return Method(f"ours_{backend}_{precision}", f"{OURS}_{backend}_{precision}", "multipart",
                  f"ours, backend {backend} {precision}, one multipart request", "tab:purple")


def ensure_archives(store: Path, with_recipe: bool, steps: Sequence[str] = ()) -> list[str]:
    """Build the demo's archives into ``store``, or keep those built from the same handler, config and weights."""
    store.mkdir(parents=True, exist_ok=True)
    build = [sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(store)]
    archives = [f"{OURS}.mar", f"{STOCK}.mar"]
    with tempfile.TemporaryDirectory() as tmp:
        commands = [[*build, "--stock", *reuse_flag(store, archives)]]
        if with_recipe:
            config = Path(tmp) / "recipe-config.yaml"
            settings = yaml.safe_load((REPO / "model-config.yaml").read_text())
            settings.setdefault("handler", {}).update({"decode_strategy": "dataloader"})
            config.write_text(yaml.safe_dump(settings))
            commands.append([*build, "--model-name", RECIPE, "--config", str(config),
                             *reuse_flag(store, [f"{RECIPE}.mar"])])
            archives.append(f"{RECIPE}.mar")
        for spec in steps:
            backend, precision = spec.split(":")
            method = step_method(spec)
            config = Path(tmp) / f"{method.archive}-config.yaml"
            settings = yaml.safe_load((REPO / "model-config.yaml").read_text())
            settings.setdefault("handler", {}).update({"backend": backend, "precision": precision})
            config.write_text(yaml.safe_dump(settings))
            commands.append([*build, "--model-name", method.archive, "--config", str(config),
                             *reuse_flag(store, [f"{method.archive}.mar"])])
            archives.append(f"{method.archive}.mar")
        with step(f"building the archives in {store} (skipped when up to date)", expected_s=10 * len(commands)):
            outputs = [subprocess.run(command, capture_output=True, text=True) for command in commands]
    for completed in outputs:
        if completed.returncode != 0:
            sys.exit(f"building an archive failed:\n{completed.stdout}{completed.stderr}")
        for line in completed.stdout.splitlines():
            if line.startswith("built ") or " is up to date " in line:
                print(f"  {line}", file=sys.stderr)
    return archives


def reuse_flag(store: Path, archives: Sequence[str]) -> list[str]:
    """--if-changed only when every archive of that build is there (it checks the first one only)."""
    return ["--if-changed"] if all((store / name).exists() for name in archives) else []


@contextmanager
def extracted(mar: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    """The archive's model-config.yaml and the path of its weights file, while the archive is unpacked."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp)
        folder = Path(tmp)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
        model_yaml = yaml.safe_load((folder / "model-config.yaml").read_text()) or {}
        yield model_yaml, folder / manifest["model"]["serializedFile"]


def load_served_model(mar: Path) -> tuple[HandlerConfig, InferenceEngine]:
    """The handler settings and an engine serving the model step the server chooses, from the archive."""
    archive = unpack_archive(mar)
    engine, choice = served_engine(archive)
    print(f"  {choice.describe()}", file=sys.stderr)
    return archive.config, engine


def reference_model(mar: Path) -> torch.nn.Module:
    """The archive's weights in a timm model built here with timm alone (not by the code under test)."""
    import timm

    with extracted(mar) as (model_yaml, weights):
        handler = model_yaml.get("handler") or {}
        architecture = handler.get("architecture", "")
        if not architecture.startswith("timm:"):
            raise SystemExit(f"{mar}: the accuracy check needs a timm model; this one is {architecture!r}")
        model = timm.create_model(architecture.removeprefix("timm:"), pretrained=False,
                                  num_classes=handler.get("num_classes", 1000))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def multipart_request(url: str, headers: dict[str, str], images: Sequence[bytes],
                      options: dict[str, str] | None = None) -> tuple[bool, list]:
    files = {f"image{i}": (f"image{i}", payload, "application/octet-stream") for i, payload in enumerate(images)}
    response = session().post(url, files=files, data=options or {}, headers=headers, timeout=600)
    body = response.json() if response.ok else []
    ok = response.ok and isinstance(body, list) and len(body) == len(images)
    return ok and all("topk" in entry for entry in body), body


def oip_binary_body(images: Sequence[bytes]) -> tuple[bytes, int]:
    """An Open Inference Protocol request with the images as binary BYTES (the client's way, unsplit)."""
    return oip.build_request([oip.Tensor("images", oip.BYTES, (len(images),), list(images))], binary=True,
                             outputs=[oip.RequestedOutput("predictions", False)])


def answers_every_image(oip_json_response: bytes | str, images: Sequence[bytes]) -> bool:
    [predictions] = [out for out in json.loads(oip_json_response)["outputs"] if out["name"] == "predictions"]
    return len(predictions["data"]) == len(images)


def oip_binary_request(url: str, headers: dict[str, str], images: Sequence[bytes]) -> bool:
    body, length = oip_binary_body(images)
    headers = {**headers, "Content-Type": oip.BINARY_CONTENT_TYPE, oip.HEADER_LENGTH: str(length)}
    response = session().post(url, data=body, headers=headers, timeout=600)
    return response.ok and answers_every_image(response.content, images)


def grpc_request(predictions: GrpcPredictions, model: str, images: Sequence[bytes]) -> bool:
    """The same OIP binary body through TorchServe's gRPC Predictions API (the client's ``--transport grpc``)."""
    body, _ = oip_binary_body(images)
    try:
        return answers_every_image(predictions.predict(model, {"body": body}, timeout=600), images)
    except grpc.RpcError:
        return False


def fan_out_request(url: str, headers: dict[str, str], images: Sequence[bytes], pool: ThreadPoolExecutor) -> bool:
    """The stock way to send N images: N concurrent one-image requests."""
    futures = [pool.submit(lambda p: session().put(url, data=p, headers=headers, timeout=600).ok, payload)
               for payload in images]
    return all(future.result() for future in futures)


def request_images(images: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The images of request ``index``: consecutive corpus images, wrapping around; the same for every method."""
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


def cell_row(set_name: str, method: Method, size: int, concurrency: int, requested: int, cell: Cell) -> dict[str, Any]:
    latencies_ms = [1e3 * s for s in cell.latencies]
    return {
        "set": set_name, "method": method.name, "archive": method.archive, "label": method.label,
        "transport": TRANSPORTS[method.transport],
        "images_per_request": size, "concurrency": concurrency, "requested": requested,
        "requests": len(cell.latencies), "images": cell.images, "errors": cell.errors, "wall_s": cell.wall_s,
        "images_per_s": cell.images / cell.wall_s if cell.wall_s else 0.0,
        "p50_ms": percentile(latencies_ms, 50), "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99),
    }


def senders(server: TorchServe, methods: Sequence[Method], pool: ThreadPoolExecutor,
            predictions: GrpcPredictions) -> dict[str, Callable]:
    headers = server.headers()
    result: dict[str, Callable[[list[bytes]], bool]] = {}
    for method in methods:
        url = f"{server.inference_url}/predictions/{method.archive}"
        if method.transport == "one-image":
            result[method.name] = lambda batch, url=url: fan_out_request(url, headers, batch, pool)
        elif method.transport == "oip-binary":
            oip_url = f"{server.inference_url}/v2/models/{method.archive}/infer"
            result[method.name] = lambda batch, url=oip_url: oip_binary_request(url, headers, batch)
        elif method.transport == "grpc":
            result[method.name] = lambda batch, name=method.archive: grpc_request(predictions, name, batch)
        else:
            result[method.name] = lambda batch, url=url: multipart_request(url, headers, batch)[0]
    return result


def benchmark(server: TorchServe, methods: Sequence[Method], args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = [(s, size, c, m) for s in args.sets for size in args.sizes for c in args.concurrency for m in methods]
    totals = {size: max(args.requests, math.ceil(args.min_images / size)) for size in args.sizes}
    rows = []
    pool_size = min(512, max(args.sizes) * max(args.concurrency))
    with (ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="fan-out") as pool,
          GrpcPredictions(server.grpc_inference_address, server.keys["inference"]) as predictions):
        send = senders(server, methods, pool, predictions)
        total_requests = sum(totals[size] + 1 for _, size, _, _ in plan)
        with tqdm(total=total_requests, desc="requests through TorchServe", unit="req", dynamic_ncols=True) as progress:
            for set_name, size, concurrency, method in plan:
                images = load_set(set_name)
                progress.set_postfix_str(f"{set_name}, {method.name}, {size} img x {concurrency} client(s)")
                run_cell(send[method.name], images, size, 1, 1, args.max_seconds, progress)  # warm-up, not counted
                cell = run_cell(send[method.name], images, size, concurrency, totals[size], args.max_seconds, progress)
                rows.append(cell_row(set_name, method, size, concurrency, totals[size], cell))
    return rows


def model_alone(model: Callable[[torch.Tensor], Any], config: HandlerConfig, sizes: Sequence[int],
                quick: bool) -> list[dict[str, Any]]:
    batches = sorted({min(size, config.max_batch) for size in sizes})
    return [model_alone_throughput(model, batch, config.intra_op_threads, torch.device("cpu"),
                                   repeats=2 if quick else 5, channels_last=config.channels_last,
                                   image_size=config.crop_size)
            for batch in batches]


def engine_breakdown(engine: InferenceEngine, config: HandlerConfig, set_names: Sequence[str],
                     sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Where the time goes without HTTP: our engine in this process, split into decode wait and model time."""
    torch.set_num_threads(config.intra_op_threads)
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


def best_rows(rows: Sequence[dict[str, Any]], set_name: str, size: int) -> dict[str, dict[str, Any]]:
    """Each method's row at its best client concurrency (most images/s) for one set and request size."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["set"] == set_name and row["images_per_request"] == size and row["images_per_s"] > 0:
            if row["method"] not in best or row["images_per_s"] > best[row["method"]]["images_per_s"]:
                best[row["method"]] = row
    return best


def ceiling(alone: Sequence[dict[str, Any]], size: int, max_batch: int) -> float | None:
    """The model-alone images/s at the batch a request of ``size`` images is run in."""
    return next((entry["images_per_s"] for entry in alone if entry["batch"] == min(size, max_batch)), None)


def summarize_runs(rows: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]],
                   max_batch: int) -> list[dict[str, Any]]:
    """Throughput per set and request size, each method at its best concurrency: ours (at its faster way of
    sending) against stock, the recipe and the model alone. Each ratio names the rows it divides."""
    summary = []
    for set_name, size in dict.fromkeys((r["set"], r["images_per_request"]) for r in rows):
        best = best_rows(rows, set_name, size)
        candidates = [best[name] for name in OURS_METHODS if name in best]
        if not candidates:
            continue
        ours = max(candidates, key=lambda r: r["images_per_s"])
        entry: dict[str, Any] = {"set": set_name, "images_per_request": size, "ours_method": ours["method"],
                                 "ours_transport": ours["transport"], "ours_concurrency": ours["concurrency"],
                                 "ours_images_per_s": ours["images_per_s"]}
        alone_ips = ceiling(alone, size, max_batch)
        if alone_ips:
            entry["model_alone_images_per_s"] = alone_ips
            entry["ours_of_model_alone"] = ours["images_per_s"] / alone_ips
        for other in ("stock", "recipe"):
            if other in best:
                entry[f"{other}_concurrency"] = best[other]["concurrency"]
                entry[f"{other}_images_per_s"] = best[other]["images_per_s"]
                entry[f"ours_over_{other}"] = ours["images_per_s"] / best[other]["images_per_s"]
        summary.append(entry)
    return summary


def request_times(rows: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]],
                  max_batch: int) -> list[dict[str, Any]]:
    """The time of one request of N images (p50), per set, N and client count: ours both ways, stock, recipe,
    the model alone's time for N images, and how many times faster than stock ours is."""
    table = []
    for set_name, size, concurrency in dict.fromkeys((r["set"], r["images_per_request"], r["concurrency"])
                                                     for r in rows):
        cell = {r["method"]: r for r in rows if (r["set"], r["images_per_request"], r["concurrency"])
                == (set_name, size, concurrency)}
        entry: dict[str, Any] = {"set": set_name, "images_per_request": size, "concurrency": concurrency}
        for name, row in cell.items():
            entry[f"{name}_p50_ms"] = row["p50_ms"]
        alone_ips = ceiling(alone, size, max_batch)
        if alone_ips:
            entry["model_alone_ms"] = 1e3 * size / alone_ips
        if "stock" in cell:
            for name in OURS_METHODS:
                if name in cell:
                    entry[f"{name}_speedup"] = cell["stock"]["p50_ms"] / cell[name]["p50_ms"]
        table.append(entry)
    return table


def served_scores(server: TorchServe, images: Sequence[bytes], classes: int, chunk: int = 16) -> list[dict[int, float]]:
    """Our served score of every class, per image (multipart requests asking for all classes)."""
    url = f"{server.inference_url}/predictions/{OURS}"
    answers = []
    for start in range(0, len(images), chunk):
        ok, body = multipart_request(url, server.headers(), images[start:start + chunk], {"topk": str(classes)})
        if not ok:
            raise RuntimeError(f"our model failed on the accuracy corpus: {str(body)[:500]}")
        answers += [{item["index"]: item["score"] for item in entry["topk"]} for entry in body]
    return answers


def accuracy(server: TorchServe, reference: torch.nn.Module, set_names: Sequence[str], count: int,
             progress: tqdm) -> list[dict[str, Any]]:
    """Our served answers against timm's own eval pipeline on the same weights, per set.

    shift: for each image, the largest |our score - the reference's| over the reference's top-5 classes.
    """
    transform = timm_transform(reference)
    result = []
    for set_name in set_names:
        images = load_set(set_name)[:count]
        expected = reference_probabilities(reference, images, transform)
        ours = served_scores(server, images, expected.shape[1])
        top5 = expected.topk(5, dim=1)
        shifts, top1, top5_same = [], 0, 0
        for scores, probabilities, indices in zip(ours, expected, top5.indices.tolist(), strict=True):
            shifts.append(max(abs(scores[i] - float(probabilities[i])) for i in indices))
            ranked = sorted(scores, key=scores.get, reverse=True)
            top1 += ranked[0] == indices[0]
            top5_same += set(ranked[:5]) == set(indices)
        result.append({"set": set_name, "images": len(images), "top1_agreement": top1 / len(images),
                       "top5_set_agreement": top5_same / len(images), "max_top5_shift": max(shifts),
                       "median_top5_shift": statistics.median(shifts)})
        progress.update(1)
    return result


def plot(rows: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]], max_batch: int, path: Path,
         subtitle: str = "") -> tuple[Path, list[str]]:
    """Per set, bars per method grouped by images per request, each labelled with its value: images/s (each
    method at its best client count) above, p50 time per request (fewest clients) below; the model alone
    drawn as a dashed line over each group. Returns the PNG's path and the labels drawn."""
    set_names = list(dict.fromkeys(r["set"] for r in rows))
    figure, axes = new_figure(len(set_names), rows=2, width=7.5, height=5.2)
    fewest = min(r["concurrency"] for r in rows)
    for column, set_name in enumerate(set_names):
        throughput_axis, latency_axis = axes[0][column], axes[1][column]
        sizes = sorted({r["images_per_request"] for r in rows if r["set"] == set_name})
        methods = [m for m in METHODS if any(r["set"] == set_name and r["method"] == m.name for r in rows)]
        width = 0.8 / len(methods)
        for index, method in enumerate(methods):
            best = [(group, best_rows(rows, set_name, size).get(method.name)) for group, size in enumerate(sizes)]
            best = [(group, row) for group, row in best if row is not None]
            bars = throughput_axis.bar([g + index * width for g, _ in best], [r["images_per_s"] for _, r in best],
                                       width, color=method.color, label=method.label)
            label_bars(throughput_axis, bars, [r["images_per_s"] for _, r in best])
            timed = [(group, next((r for r in rows if r["set"] == set_name and r["method"] == method.name
                                   and r["images_per_request"] == size and r["concurrency"] == fewest), None))
                     for group, size in enumerate(sizes)]
            timed = [(group, row) for group, row in timed if row is not None]
            bars = latency_axis.bar([g + index * width for g, _ in timed], [r["p50_ms"] for _, r in timed],
                                    width, color=method.color, label=method.label)
            label_bars(latency_axis, bars, [r["p50_ms"] for _, r in timed])
        for group, size in enumerate(sizes):
            alone_ips = ceiling(alone, size, max_batch)
            if not alone_ips:
                continue
            left, right = group - width / 2, group + (len(methods) - 0.5) * width
            for axis, value in ((throughput_axis, alone_ips), (latency_axis, 1e3 * size / alone_ips)):
                axis.hlines(value, left, right, colors="black", linestyles="--",
                            label="model alone (no server, no decode)" if group == 0 else None)
                axis.text(right, value, f" model alone\n {format_value(value)}", fontsize=7, va="center")
        ticks = [g + (len(methods) - 1) * width / 2 for g in range(len(sizes))]
        for axis in (throughput_axis, latency_axis):
            axis.set_xticks(ticks, [f"{size} images per request" for size in sizes])
            axis.set_xlim(-0.5, len(sizes) - 0.1)
            axis.margins(y=0.15)
        throughput_axis.set_ylabel("images per second (higher is better)")
        throughput_axis.set_title(f"{SET_TITLES.get(set_name, set_name)}{subtitle}\n"
                                  f"throughput, each method at its best client count", fontsize=10)
        latency_axis.set_ylabel("p50 time per request, ms (lower is better)")
        latency_axis.set_title(f"time of one request with {fewest} client{'' if fewest == 1 else 's'}", fontsize=10)
        latency_axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    drawn = drawn_labels(figure)
    return save_figure(figure, path), drawn


def report(rows, alone, times, summary, agreement, breakdown) -> str:
    parts = [format_table(rows, [
        ("set", "set"), ("method", "method"), ("images_per_request", "img/req"),
        ("concurrency", "clients", "client threads sending requests at the same time"),
        ("requests", "requests", "timed requests (after one warm-up request)"), ("errors", "errors"),
        ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms", "p50, p95, p99: percentiles of the time per "
                                                                          "request"),
        ("images_per_s", "images/s", "images answered / wall time of the case")])]
    parts.append("methods:\n" + "\n".join(f"  {m.name}: {m.label}" for m in METHODS))
    parts.append("time of one request of N images (p50 ms):\n" + format_table(times, [
        ("set", "set"), ("images_per_request", "N"), ("concurrency", "clients"),
        ("ours_p50_ms", "ours, 1 request", "one multipart request of N images"),
        ("ours_oip_p50_ms", "ours, 1 OIP", "one OIP binary request of N images"),
        ("ours_grpc_p50_ms", "ours, 1 gRPC", "one gRPC request of N images (OIP binary body)"),
        ("ours_one_per_request_p50_ms", "ours, N requests", "N concurrent one-image requests (batched by TorchServe)"),
        ("stock_p50_ms", "stock, N requests", "stock image_classifier, N concurrent one-image requests"),
        ("recipe_p50_ms", "recipe, 1 request"),
        ("model_alone_ms", "model alone", "the model's forward passes for N images, no server, no decode"),
        ("ours_speedup", "stock/ours (1 req)", "stock p50 / ours p50, one multipart request (> 1: ours is faster)"),
        ("ours_oip_speedup", "stock/ours (1 OIP)", "stock p50 / ours p50, one OIP binary request"),
        ("ours_grpc_speedup", "stock/ours (1 gRPC)", "stock p50 / ours p50, one gRPC request"),
        ("ours_one_per_request_speedup", "stock/ours (N req)", "stock p50 / ours p50, N one-image requests")]))
    parts.append(format_table(alone, [
        ("batch", "model-alone batch"), ("threads", "torch threads"), ("median_s", "median s"),
        ("spread_pct", "IQR %", "spread of the timed forwards: (p75 - p25) / median"), ("images_per_s", "images/s")]))
    if summary:
        parts.append("throughput, each method at its best client count:\n" + format_table(summary, [
            ("set", "set"), ("images_per_request", "img/req"), ("ours_images_per_s", "ours img/s"),
            ("ours_transport", "ours sent as", "ours at its faster way of sending the images"),
            ("stock_images_per_s", "stock img/s"), ("recipe_images_per_s", "recipe img/s"),
            ("model_alone_images_per_s", "model alone img/s"),
            ("ours_over_stock", "ours/stock", "ours images/s / stock images/s (> 1: ours is faster)"),
            ("ours_of_model_alone", "ours/model alone", "share of the model-alone ceiling that ours reaches")]))
    if agreement:
        parts.append("accuracy: our served answers vs timm's own eval pipeline, same weights:\n" + format_table(
            agreement, [("set", "set"), ("images", "images"),
                        ("top1_agreement", "top-1 agreement", "share of images with the same top class"),
                        ("top5_set_agreement", "same top-5", "share of images with the same five top classes"),
                        ("max_top5_shift", "max top-5 shift", "per image, the largest |ours - timm| score among "
                                                             "timm's top-5 classes; the worst image"),
                        ("median_top5_shift", "median top-5 shift", "the same, median over the images")]))
    parts.append("our engine in this process, no HTTP (where the time goes):\n" + format_table(breakdown, [
        ("set", "set"), ("images", "images"), ("wall_s", "wall s"),
        ("decode_wait_s", "waiting for decode s", "time the model waited for decoded images"),
        ("model_s", "copy+normalize+model s"), ("other_s", "other s"), ("images_per_s", "images/s")]))
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
    parser.add_argument("--steps", nargs="*", default=[], metavar="BACKEND:PRECISION",
                        help="also serve archives of ours with these model steps, e.g. eager:fp32 inductor:fp32")
    parser.add_argument("--no-recipe", dest="recipe", action="store_false",
                        help="skip the DataLoader-per-request variant of our handler")
    parser.add_argument("--accuracy-images", type=int, default=64,
                        help="images per set (imagenet, phone, mixed) checked against timm's pipeline (0: skip)")
    parser.add_argument("--model-store", type=Path, help="reuse/build the archives here (default OUT/model_store)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: imagenet, 8 images per request, 2 clients, no recipe; recommends nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.sizes, args.concurrency = ["imagenet"], [8], [2]
        args.requests, args.min_images, args.max_seconds, args.recipe, args.accuracy_images = 2, 0, 300.0, False, 16
    if min(args.sizes) < 1 or min(args.concurrency) < 1 or args.requests < 1:
        parser.error("sizes, concurrency and requests must be at least 1")
    for spec in args.steps:
        backend, _, precision = spec.partition(":")
        if backend not in BACKENDS or precision not in PRECISIONS:
            parser.error(f"--steps {spec}: write BACKEND:PRECISION with a backend of {', '.join(BACKENDS)} and a "
                         f"precision of {', '.join(PRECISIONS)}")
    args.model_store = args.model_store or args.out / "model_store"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        print(SMOKE_NOTICE, flush=True)
    machine = machine_info()  # the date is when the run started
    ensure_corpus()
    archives = ensure_archives(args.model_store, args.recipe, args.steps)
    methods = [m for m in [*METHODS, *map(step_method, args.steps)] if f"{m.archive}.mar" in archives]
    with step("loading the model from our archive, and timm's reference model", expected_s=5):
        config, engine = load_served_model(args.model_store / f"{OURS}.mar")
        reference = reference_model(args.model_store / f"{OURS}.mar")
    batches = sorted({min(size, config.max_batch) for size in args.sizes})
    with step(f"timing the model step alone ({engine.step.describe()}) at batch {', '.join(map(str, batches))}",
              expected_s=5 * len(batches)):
        alone = model_alone(engine.step, config, args.sizes, args.quick)
    with step(f"timing our engine in this process, {max(args.sizes)} images per set", expected_s=5 * len(args.sets)):
        try:
            breakdown = engine_breakdown(engine, config, args.sets, [max(args.sizes)], 1 if args.quick else 3)
        finally:
            engine.close()
    accuracy_sets = ["imagenet", "mixed"] if args.quick else ["imagenet", "phone", "mixed"]
    with ExitStack() as stack:
        # A private server (own ports, TMPDIR and worker sockets); its logs are kept only if something fails.
        with step(f"starting TorchServe with {len(archives)} models", expected_s=15 * len(archives)):
            server = stack.enter_context(TorchServe(args.model_store, archives,
                                                    extra_config={"job_queue_size": "1000"}))
        rows = benchmark(server, methods, args)
        agreement = []
        if args.accuracy_images:
            with tqdm(total=len(accuracy_sets), desc="accuracy against timm's pipeline", unit="set") as progress:
                agreement = accuracy(server, reference, accuracy_sets, args.accuracy_images, progress)
    summary = summarize_runs(rows, alone, config.max_batch)
    times = request_times(rows, alone, config.max_batch)
    png_path, labels = plot(rows, alone, config.max_batch, args.out / "bench_serve.png",
                            " (SMOKE RUN)" if args.quick else "")
    result = {
        "benchmark": "serve", "quick": args.quick, "machine": machine,
        "settings": {k: v for k, v in vars(args).items()},
        "model": config.architecture, "model_step": engine.step.describe(),
        "methods": {m.name: m.label for m in methods},
        "handler": {"max_batch": config.max_batch, "decode_threads": config.pool_size,
                    "torch_threads": config.intra_op_threads, "decode_strategy": config.decode_strategy,
                    **{key: getattr(config, key) for key in ("resize_size", "crop_size", "interpolation", "mean",
                                                             "std")}},
        "model_alone": alone, "engine_in_process": breakdown, "results": rows, "request_times": times,
        "summary": summary, "accuracy": agreement, "plot_labels": labels,
        "notes": ["summary: each method at its best client concurrency; ours at its faster way of sending",
                  "client and server share this machine's cores"],
    }
    json_path = write_json(args.out / "bench_serve.json", result)
    print()
    print(report(rows, alone, times, summary, agreement, breakdown))
    print(f"\nwrote {json_path} and {png_path}")
    if args.quick:
        print(SMOKE_NOTICE)


if __name__ == "__main__":
    main()
