#!/usr/bin/env python3
"""Preprocessing alone (no server, no model): bytes in, a normalized batch on the device out.

Three ways, side by side, on the same images:
  stock   TorchServe's image_classifier: per image Image.open + Resize(256) / CenterCrop(224) /
          ToTensor / Normalize in float32, sequential, then torch.stack and .to(device)
  recipe  a torch DataLoader built per batch (num_workers N, pin_memory on CUDA) over a dataset doing the
          same float transform per image; the time includes building the DataLoader and its workers
  ours    handler.preprocess.Preprocessor (persistent decode thread pool, reduced-size JPEG decode, uint8
          crops) -> uint8 staging buffer (pinned on CUDA) -> non_blocking copy -> on-device normalize

On CUDA every clock read follows torch.cuda.synchronize(), and the host-to-device copy is included.
The stock handler does not convert to RGB (grey/RGBA images fail there), so the mixed set is timed
for recipe and ours only.

    python scripts/bench_preprocess.py                       # all sets, batches 32/64/128
    python scripts/bench_preprocess.py --sets imagenet phone --batches 32
    python scripts/bench_preprocess.py --quick               # < 1 minute, for the tests
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
from baselines import recipe_batch, stock_batch
from bench_common import (
    DEFAULT_OUT,
    SET_TITLES,
    SETS,
    best_device,
    format_table,
    load_set,
    machine_info,
    new_figure,
    save_figure,
    summarize,
    time_call,
    write_json,
)
from reference import reference_tensor
from tqdm import tqdm

from handler.codecs import ImageError
from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.preprocess import Preprocessor

# Targets from the issue: ours / stock preprocessing throughput on a 2-core CPU.
TARGETS = {"imagenet": 5.0, "phone": 18.0}
STOCK_UNSUPPORTED = frozenset({"mixed"})


@dataclass(frozen=True)
class Method:
    name: str  # stock | recipe | ours
    param: int  # torch threads (stock; 0: torch's default), DataLoader workers (recipe), decode threads (ours)

    @property
    def label(self) -> str:
        if self.name == "recipe":
            return f"recipe (DataLoader, {self.param} workers)"
        if self.name == "ours":
            return f"ours ({self.param} threads)"
        threads = self.param or torch.get_num_threads()
        return f"stock (sequential PIL + float, {threads} torch threads)"


class OursRunner:
    """Our pipeline at one pool size; the pool, staging buffer and normalize constants persist across calls."""

    def __init__(self, threads: int, batch: int, device: torch.device) -> None:
        config = HandlerConfig(decode_threads=threads, max_batch=batch, warmup=False,
                               cpu_count=os.cpu_count() or 1)
        self.device = device
        self.preprocessor = Preprocessor(config)
        self.engine = InferenceEngine(config, torch.nn.Identity(), device, self.preprocessor)
        shape = (batch, config.crop_size, config.crop_size, 3)
        self.staging = torch.empty(shape, dtype=torch.uint8, pin_memory=device.type == "cuda")

    def __call__(self, images: Sequence[bytes]) -> torch.Tensor:
        rows = 0
        for crop in self.preprocessor.map(images):
            if isinstance(crop, ImageError):
                raise RuntimeError(f"our pipeline rejected a corpus image: {crop.message}")
            self.staging[rows].numpy()[...] = crop
            rows += 1
        with torch.inference_mode():
            return self.engine.normalize(self.staging[:rows].to(self.device, non_blocking=True))

    def close(self) -> None:
        self.engine.close()


def methods_for(set_name: str, args: argparse.Namespace) -> list[Method]:
    methods = [] if set_name in STOCK_UNSUPPORTED else [Method("stock", n) for n in args.stock_torch_threads]
    loader_workers, threads = args.loader_workers, args.threads
    methods += [Method("recipe", workers) for workers in loader_workers]
    methods += [Method("ours", count) for count in threads]
    return methods


def runner_for(method: Method, batch: int, device: torch.device) -> tuple[Callable, Callable[[], None]]:
    """The timed function for one method and its clean-up."""
    if method.name == "stock":
        return (lambda images: stock_batch(images, device, method.param)), (lambda: None)
    if method.name == "recipe":
        return (lambda images: recipe_batch(images, device, method.param)), (lambda: None)
    ours = OursRunner(method.param, batch, device)
    return ours, ours.close


def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Time every method on the same images, interleaved round by round so machine noise hits all alike."""
    cases = [(set_name, batch) for set_name in args.sets for batch in args.batches]
    rows = []
    progress = tqdm(total=sum(len(methods_for(s, args)) for s, _ in cases)
                    * (args.warmup + args.repeats), desc="preprocess", unit="call", dynamic_ncols=True)
    with progress:
        for set_name, batch in cases:
            methods = methods_for(set_name, args)
            samples = measure_case(load_set(set_name, batch), batch, methods, args, device, progress)
            for method in methods:
                stats = summarize(samples[method])
                rows.append({"set": set_name, "batch": batch, "method": method.name, "param": method.param,
                             "label": method.label, **stats, "images_per_s": batch / stats["median_s"],
                             "ms_per_image": 1e3 * stats["median_s"] / batch})
    return rows


def measure_case(images: list[bytes], batch: int, methods: Sequence[Method], args: argparse.Namespace,
                 device: torch.device, progress: tqdm) -> dict[Method, list[float]]:
    runners = {method: runner_for(method, batch, device) for method in methods}
    samples: dict[Method, list[float]] = {method: [] for method in methods}
    deadline = time.monotonic() + args.max_seconds * len(methods)
    try:
        for function, _ in runners.values():
            for _ in range(args.warmup):
                function(images)
            progress.update(args.warmup)
        for round_index in range(args.repeats):
            if round_index >= 2 and time.monotonic() > deadline:
                break
            for method, (function, _) in runners.items():
                samples[method].append(time_call(functools.partial(function, images), device))
                progress.update(1)
    finally:
        for _, close in runners.values():
            close()
    return samples


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours (best pool size) against stock and against the best recipe, per set and batch."""
    result = []
    for set_name, batch in sorted({(r["set"], r["batch"]) for r in rows}):
        cell = [r for r in rows if r["set"] == set_name and r["batch"] == batch]
        ours = max((r for r in cell if r["method"] == "ours"), key=lambda r: r["images_per_s"], default=None)
        stock = max((r for r in cell if r["method"] == "stock"), key=lambda r: r["images_per_s"], default=None)
        recipe = max((r for r in cell if r["method"] == "recipe"), key=lambda r: r["images_per_s"], default=None)
        if ours is None:
            continue
        entry: dict[str, Any] = {"set": set_name, "batch": batch, "ours_best": ours["label"],
                                 "ours_images_per_s": ours["images_per_s"]}
        if stock is not None:
            entry["best_stock"] = stock["label"]
            entry["stock_images_per_s"] = stock["images_per_s"]
            entry["ours_over_stock"] = ours["images_per_s"] / stock["images_per_s"]
            target = TARGETS.get(set_name)
            if target is not None:
                entry["target"] = target
                entry["meets_target"] = entry["ours_over_stock"] >= target
        if recipe is not None:
            entry["best_recipe"] = recipe["label"]
            entry["ours_over_best_recipe"] = ours["images_per_s"] / recipe["images_per_s"]
        result.append(entry)
    return result


def input_agreement(set_names: Sequence[str], count: int, device: torch.device) -> list[dict[str, Any]]:
    """How far our normalized inputs are from the full-decode reference, in 0-255 pixel levels."""
    result = []
    for set_name in set_names:
        images = load_set(set_name)[:count]
        ours = OursRunner(threads=os.cpu_count() or 1, batch=len(images), device=device)
        try:
            batch = ours(images).float().cpu()
        finally:
            ours.close()
        reference = torch.stack([reference_tensor(payload) for payload in images])
        std = torch.tensor(ours.engine.config.std).view(1, 3, 1, 1)
        levels = (batch - reference).abs().mul(std).mul(255)
        result.append({"set": set_name, "images": len(images), "max_abs_diff_levels": float(levels.max()),
                       "mean_abs_diff_levels": float(levels.mean())})
    return result


def profile_ours(set_name: str, batch: int, top: int = 12) -> list[dict[str, Any]]:
    """cProfile of our per-image work on one thread (inline strategy): which calls the time goes to."""
    images = load_set(set_name, batch)
    preprocessor = Preprocessor(HandlerConfig(decode_strategy="inline", warmup=False))
    list(preprocessor.map(images[:2]))  # warm-up
    profiler = cProfile.Profile()
    profiler.runcall(lambda: list(preprocessor.map(images)))
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), entry in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}({function})", "calls": entry[1],
                     "own_s": entry[2], "own_pct": 100.0 * entry[2] / total, "ms_per_image": 1e3 * entry[2] / batch})
    return sorted(rows, key=lambda row: row["own_s"], reverse=True)[:top]


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    set_names = list(dict.fromkeys(r["set"] for r in rows))
    figure, axes = new_figure(len(set_names), height=5.5)
    palette = {"stock": "Reds", "recipe": "Blues", "ours": "Greens"}
    colors = {}
    for method, cmap in palette.items():
        labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] == method))
        for index, label in enumerate(labels):
            colors[label] = matplotlib.colormaps[cmap](0.45 + 0.45 * index / max(1, len(labels) - 1))
    for axis, set_name in zip(axes[0], set_names, strict=True):
        cell = [r for r in rows if r["set"] == set_name]
        batches = sorted({r["batch"] for r in cell})
        labels = list(dict.fromkeys(r["label"] for r in cell))
        width = 0.8 / len(labels)
        for index, label in enumerate(labels):
            values = [next((r["images_per_s"] for r in cell if r["batch"] == b and r["label"] == label), 0.0)
                      for b in batches]
            axis.bar([i + index * width for i in range(len(batches))], values, width, label=label,
                     color=colors[label])
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        axis.set_yscale("log")
        axis.set_ylabel("images/s (log scale, higher is better)")
        axis.set_title(f"preprocessing: {SET_TITLES.get(set_name, set_name)}", fontsize=10)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    return save_figure(figure, path)


def report(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], agreement: list[dict[str, Any]]) -> str:
    parts = [format_table(rows, [("set", "set"), ("batch", "batch"), ("label", "method"),
                                 ("median_s", "median s"), ("spread_pct", "IQR %"), ("n", "runs"),
                                 ("ms_per_image", "ms/image"), ("images_per_s", "images/s")])]
    if ratios:
        parts.append(format_table(ratios, [("set", "set"), ("batch", "batch"), ("ours_best", "ours best"),
                                           ("ours_over_stock", "ours/stock"), ("target", "target"),
                                           ("meets_target", "met"), ("ours_over_best_recipe", "ours/best recipe")]))
    if agreement:
        parts.append(format_table(agreement, [("set", "set"), ("images", "images"),
                                              ("mean_abs_diff_levels", "mean |ours-ref| (levels)"),
                                              ("max_abs_diff_levels", "max |ours-ref| (levels)")]))
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="corpus sets to time")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128], help="images per batch")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4], help="our decode pool sizes")
    parser.add_argument("--stock-torch-threads", nargs="+", type=int, default=[0, 1],
                        help="torch threads for the stock method (0: torch's default, as in TorchServe)")
    parser.add_argument("--loader-workers", nargs="+", type=int, default=[1, 2, 4],
                        help="num_workers of the DataLoader-per-request recipe")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (at most)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="seconds per method: stop the rounds of a set/batch after that (still 2 timed calls each)")
    parser.add_argument("--check-images", type=int, default=32,
                        help="images per set compared with the full-decode reference (0: skip)")
    parser.add_argument("--profile", nargs="*", choices=SETS, default=[],
                        help="also cProfile our per-image work on one thread for these sets (where the time goes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run for the tests (< 1 minute): small batch, fewer variants, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets = [s for s in args.sets if s != "mixed"] or ["imagenet"]
        args.batches, args.threads, args.loader_workers = [8], [1, 2], [2]
        args.warmup, args.repeats, args.max_seconds, args.check_images = 1, 2, 5.0, 4
    if min(args.batches) < 1 or min(args.threads) < 1 or min(args.loader_workers) < 0:
        parser.error("batches and threads must be at least 1, loader workers at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()  # the date is when the run started
    # More DataLoader workers than cores is one of the recipe settings being measured, on purpose.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    device = best_device()
    rows = measure(args, device)
    ratios = speedups(rows)
    agreement = input_agreement(args.sets, args.check_images, device) if args.check_images else []
    profiles = {set_name: profile_ours(set_name, max(args.batches)) for set_name in args.profile}
    result = {
        "benchmark": "preprocess", "machine": machine, "device": str(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows, "speedups": ratios, "input_agreement": agreement,
        "profile": profiles,
        "notes": ["ours/stock compares our best pool size with the best stock variant",
                  "the stock method cannot read the mixed set (it does not convert to RGB)",
                  "batches larger than a set repeat its images cyclically"],
    }
    json_path = write_json(args.out / "bench_preprocess.json", result)
    png_path = plot(rows, args.out / "bench_preprocess.png")
    print(report(rows, ratios, agreement))
    for set_name, profile in profiles.items():
        print(f"\nwhere our time goes, {set_name}, one thread (cProfile, own time):\n" + format_table(
            profile, [("function", "function"), ("calls", "calls"), ("ms_per_image", "ms/image"),
                      ("own_pct", "% of total")]))
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
