#!/usr/bin/env python3
"""Preprocessing alone (no server, no model): bytes in, a normalized batch on the device out.

Three ways, side by side, on the same images, all with the trained demo's preprocessing (EfficientNet-Lite0:
resize 256, center crop 224, bicubic, mean and std 0.5), resolved once exactly as scripts/build_mar.py
records it in the archive (model-config.yaml's handler: values > the model's timm config > defaults):
  stock   TorchServe's image_classifier, as build_mar.py --stock packs it: per image Image.open +
          Resize / CenterCrop / ToTensor / Normalize in float32, one by one, then torch.stack and .to(device)
  recipe  a torch DataLoader built per batch (num_workers N, pin_memory on CUDA) over a dataset doing the
          same float transform per image; the time includes building the DataLoader and its workers
  ours    handler.preprocess.Preprocessor (persistent decode thread pool, reduced-size JPEG decode, uint8
          crops) -> uint8 staging buffer (pinned on CUDA) -> non_blocking copy -> on-device normalize

On CUDA every clock read follows torch.cuda.synchronize(), and the host-to-device copy is included.
The stock handler does not convert to RGB (grey/RGBA images fail there), so the mixed set is timed
for recipe and ours only. Our inputs are also compared with timm's own eval transform, in pixel levels.

    python bench/bench_preprocess.py                       # all sets, batches 32/64/128 (the longest run)
    python bench/bench_preprocess.py --sets imagenet phone --batches 32
    python bench/bench_preprocess.py --quick               # a smoke run (< 1 minute) that recommends nothing
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # importing torch takes seconds: say so first
    print(f"{Path(__file__).name}: loading torch, timm and the handler ...", file=sys.stderr, flush=True)

import argparse
import cProfile
import dataclasses
import functools
import os
import pstats
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import torch
from baselines import recipe_batch, stock_batch
from bench_common import (
    DEFAULT_OUT,
    PREPROCESSING_KEYS,
    SET_TITLES,
    SETS,
    SMOKE_NOTICE,
    best_device,
    demo_handler_settings,
    drawn_labels,
    ensure_corpus,
    format_table,
    label_bars,
    load_set,
    machine_info,
    new_figure,
    save_figure,
    step,
    summarize,
    time_call,
    write_json,
)
from tqdm import tqdm

from handler.codecs import ImageError
from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.preprocess import Preprocessor
from tests.harness.reference import Transform, eval_transform, reference_tensor, timm_transform

STOCK_UNSUPPORTED = frozenset({"mixed"})


@dataclass(frozen=True)
class Method:
    name: str  # stock | recipe | ours
    param: int  # torch threads (stock; 0: torch's default), DataLoader workers (recipe), decode threads (ours)

    @property
    def label(self) -> str:
        if self.name == "recipe":
            return f"recipe (DataLoader, {plural(self.param, 'worker')})"
        if self.name == "ours":
            return f"ours ({plural(self.param, 'thread')})"
        threads = self.param or torch.get_num_threads()
        return f"stock (one by one, PIL + float, {plural(threads, 'torch thread')})"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def stock_transform(settings: HandlerConfig) -> Transform:
    """The stock archive's transform (build_mar.py --stock): Resize / CenterCrop / ToTensor / Normalize."""
    return eval_transform(settings.resize_size, settings.crop_size, settings.interpolation, settings.mean,
                          settings.std)


class OursRunner:
    """Our pipeline at one pool size; the pool, staging buffer and normalize constants persist across calls."""

    def __init__(self, settings: HandlerConfig, threads: int, batch: int, device: torch.device) -> None:
        config = dataclasses.replace(settings, decode_strategy="threads", decode_threads=threads, max_batch=batch,
                                     warmup=False, cpu_count=os.cpu_count() or 1)
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
    methods += [Method("recipe", workers) for workers in args.loader_workers]
    methods += [Method("ours", count) for count in args.threads]
    return methods


def runner_for(method: Method, batch: int, device: torch.device,
               settings: HandlerConfig) -> tuple[Callable, Callable[[], None]]:
    """The timed function for one method and its clean-up."""
    transform = stock_transform(settings)
    if method.name == "stock":
        return (lambda images: stock_batch(images, device, method.param, transform=transform)), (lambda: None)
    if method.name == "recipe":
        return (lambda images: recipe_batch(images, device, method.param, transform=transform)), (lambda: None)
    ours = OursRunner(settings, method.param, batch, device)
    return ours, ours.close


def measure(args: argparse.Namespace, device: torch.device, settings: HandlerConfig) -> list[dict[str, Any]]:
    """Time every method on the same images, interleaved round by round so machine noise hits all alike."""
    cases = [(set_name, batch) for set_name in args.sets for batch in args.batches]
    rows = []
    calls = sum(len(methods_for(s, args)) for s, _ in cases) * (args.warmup + args.repeats)
    with tqdm(total=calls, desc="timing preprocessing", unit="call", dynamic_ncols=True) as progress:
        for set_name, batch in cases:
            methods = methods_for(set_name, args)
            progress.set_postfix_str(f"{set_name}, batch {batch}")
            samples = measure_case(load_set(set_name, batch), batch, methods, args, device, settings, progress)
            for method in methods:
                stats = summarize(samples[method])
                rows.append({"set": set_name, "batch": batch, "method": method.name, "param": method.param,
                             "label": method.label, **stats, "images_per_s": batch / stats["median_s"],
                             "ms_per_image": 1e3 * stats["median_s"] / batch})
    return rows


def measure_case(images: list[bytes], batch: int, methods: Sequence[Method], args: argparse.Namespace,
                 device: torch.device, settings: HandlerConfig, progress: tqdm) -> dict[Method, list[float]]:
    runners = {method: runner_for(method, batch, device, settings) for method in methods}
    samples: dict[Method, list[float]] = {method: [] for method in methods}
    deadline = time.monotonic() + args.max_seconds * len(methods)
    try:
        for function, _ in runners.values():
            for _ in range(args.warmup):
                function(images)
            progress.update(args.warmup)
        for round_index in range(args.repeats):
            if round_index >= 2 and time.monotonic() > deadline:
                progress.update(len(methods) * (args.repeats - round_index))
                break
            for method, (function, _) in runners.items():
                samples[method].append(time_call(functools.partial(function, images), device))
                progress.update(1)
    finally:
        for _, close in runners.values():
            close()
    return samples


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours (best pool size) against the best stock variant and the best recipe, per set and batch."""
    result = []
    for set_name, batch in dict.fromkeys((r["set"], r["batch"]) for r in rows):
        cell = [r for r in rows if r["set"] == set_name and r["batch"] == batch]
        best = {name: max((r for r in cell if r["method"] == name), key=lambda r: r["images_per_s"], default=None)
                for name in ("ours", "stock", "recipe")}
        ours = best["ours"]
        if ours is None:
            continue
        entry: dict[str, Any] = {"set": set_name, "batch": batch, "ours_best": ours["label"],
                                 "ours_images_per_s": ours["images_per_s"]}
        if best["stock"] is not None:
            entry["best_stock"] = best["stock"]["label"]
            entry["stock_images_per_s"] = best["stock"]["images_per_s"]
            entry["ours_over_stock"] = ours["images_per_s"] / best["stock"]["images_per_s"]
        if best["recipe"] is not None:
            entry["best_recipe"] = best["recipe"]["label"]
            entry["recipe_images_per_s"] = best["recipe"]["images_per_s"]
            entry["ours_over_best_recipe"] = ours["images_per_s"] / best["recipe"]["images_per_s"]
        result.append(entry)
    return result


def input_agreement(set_names: Sequence[str], count: int, device: torch.device, settings: HandlerConfig,
                    reference: Transform) -> list[dict[str, Any]]:
    """How far our normalized inputs, and the stock method's, are from timm's own eval transform (full decode),
    in 0-255 pixel levels: the check that every method preprocesses like the model was trained."""
    result = []
    for set_name in set_names:
        images = load_set(set_name)[:count]
        ours = OursRunner(settings, threads=os.cpu_count() or 1, batch=len(images), device=device)
        try:
            batch = ours(images).float().cpu()
        finally:
            ours.close()
        expected = torch.stack([reference_tensor(payload, reference) for payload in images])
        std = torch.tensor(settings.std).view(1, 3, 1, 1)
        levels = (batch - expected).abs().mul(std).mul(255)
        entry = {"set": set_name, "images": len(images), "max_abs_diff_levels": float(levels.max()),
                 "mean_abs_diff_levels": float(levels.mean())}
        if set_name not in STOCK_UNSUPPORTED:
            stock = stock_batch(images, torch.device("cpu"), transform=stock_transform(settings))
            entry["stock_max_abs_diff_levels"] = float((stock - expected).abs().mul(std).mul(255).max())
        result.append(entry)
    return result


def profile_ours(set_name: str, batch: int, settings: HandlerConfig, top: int = 12) -> list[dict[str, Any]]:
    """cProfile of our per-image work on one thread (inline strategy): which calls the time goes to."""
    images = load_set(set_name, batch)
    preprocessor = Preprocessor(dataclasses.replace(settings, decode_strategy="inline", warmup=False))
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


def plot(rows: Sequence[dict[str, Any]], path: Path, subtitle: str = "") -> tuple[Path, list[str]]:
    """Images/s bars per method, one panel per set, grouped by batch size, each bar labelled with its value.

    Returns the PNG's path and the value labels drawn on the bars.
    """
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
            positions, values = [], []
            for group, batch in enumerate(batches):
                row = next((r for r in cell if r["batch"] == batch and r["label"] == label), None)
                if row is not None:
                    positions.append(group + index * width)
                    values.append(row["images_per_s"])
            bars = axis.bar(positions, values, width, label=label, color=colors[label])
            label_bars(axis, bars, values)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch of {b} images" for b in batches])
        axis.set_ylabel("images per second (higher is better)")
        axis.margins(y=0.12)
        axis.set_title(f"preprocessing only: {SET_TITLES.get(set_name, set_name)}{subtitle}", fontsize=10)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    drawn = drawn_labels(figure)
    return save_figure(figure, path), drawn


def report(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], agreement: list[dict[str, Any]]) -> str:
    parts = [format_table(rows, [
        ("set", "set"), ("batch", "batch", "images per call"), ("label", "method"),
        ("median_s", "median s", "median time of one call (the whole batch)"),
        ("spread_pct", "IQR %", "spread of the timed calls: (p75 - p25) / median"),
        ("n", "runs", "timed calls"), ("ms_per_image", "ms/image"), ("images_per_s", "images/s")])]
    if ratios:
        parts.append(format_table(ratios, [
            ("set", "set"), ("batch", "batch"), ("ours_best", "ours at its best pool size"),
            ("ours_images_per_s", "ours img/s"), ("stock_images_per_s", "stock img/s", "the faster stock variant"),
            ("recipe_images_per_s", "recipe img/s", "the fastest DataLoader setting"),
            ("ours_over_stock", "ours/stock", "ours images/s / the faster stock variant's (> 1: ours is faster)"),
            ("ours_over_best_recipe", "ours/recipe", "ours images/s / the fastest DataLoader recipe's")]))
    if agreement:
        parts.append(format_table(agreement, [
            ("set", "set"), ("images", "images"),
            ("mean_abs_diff_levels", "mean |ours-timm|", "mean difference from timm's own eval transform, in "
                                                         "0-255 pixel levels"),
            ("max_abs_diff_levels", "max |ours-timm|", "largest difference of any pixel value (12 MP photos: "
                                                       "reduced-size JPEG decode)"),
            ("stock_max_abs_diff_levels", "max |stock-timm|", "the same for the stock method's inputs (the recipe "
                                                              "uses the same transform)")]))
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
                        help="images per set compared with timm's own eval transform (0: skip)")
    parser.add_argument("--profile", nargs="*", choices=SETS, default=[],
                        help="also cProfile our per-image work on one thread for these sets (where the time goes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (< 1 minute): batch 8, fewer variants, 2 repeats; recommends nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets = [s for s in args.sets if s != "mixed"] or ["imagenet"]
        args.batches, args.threads, args.loader_workers = [8], [1, 2], [2]
        args.warmup, args.repeats, args.max_seconds, args.check_images = 1, 2, 5.0, 8
    if min(args.batches) < 1 or min(args.threads) < 1 or min(args.loader_workers) < 0 or args.repeats < 1:
        parser.error("batches, threads and repeats must be at least 1, loader workers at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        print(SMOKE_NOTICE, flush=True)
    machine = machine_info()  # the date is when the run started
    # More DataLoader workers than cores is one of the recipe settings being measured, on purpose.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    device = best_device()
    ensure_corpus()
    with step("resolving the demo's preprocessing as build_mar.py does", expected_s=2):
        section, sources = demo_handler_settings()
        settings = HandlerConfig.from_mapping(section)
        import timm  # the reference: timm's own eval transform for the demo architecture, independent of ours

        reference = timm_transform(timm.create_model(settings.architecture.removeprefix("timm:"), pretrained=False))
    preprocessing = {key: section[key] for key in PREPROCESSING_KEYS}
    print(f"demo preprocessing ({settings.architecture}):", ", ".join(
        f"{key} {preprocessing[key]}" for key in PREPROCESSING_KEYS), flush=True)
    for source in dict.fromkeys(sources.values()):
        print(f"  {', '.join(k for k in PREPROCESSING_KEYS if sources[k] == source)} from {source}", flush=True)

    rows = measure(args, device, settings)
    ratios = speedups(rows)
    agreement = []
    if args.check_images:
        with step(f"comparing our inputs with timm's eval transform ({args.check_images} images per set)",
                  expected_s=5 * len(args.sets)):
            agreement = input_agreement(args.sets, args.check_images, device, settings, reference)
    profiles = {}
    for set_name in args.profile:
        with step(f"profiling our per-image work on {set_name}", expected_s=10):
            profiles[set_name] = profile_ours(set_name, max(args.batches), settings)
    png_path, labels = plot(rows, args.out / "bench_preprocess.png",
                            " (SMOKE RUN)" if args.quick else "")
    result = {
        "benchmark": "preprocess", "quick": args.quick, "machine": machine, "device": str(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "preprocessing": preprocessing, "preprocessing_sources": sources,
        "results": rows, "speedups": ratios, "input_agreement": agreement, "profile": profiles,
        "plot_labels": labels,
        "notes": ["ours/stock compares our best pool size with the best stock variant",
                  "the stock method cannot read the mixed set (it does not convert to RGB)",
                  "batches larger than a set repeat its images cyclically"],
    }
    json_path = write_json(args.out / "bench_preprocess.json", result)
    print()
    print(report(rows, ratios, agreement))
    for set_name, profile in profiles.items():
        print(f"\nwhere our time goes, {set_name}, one thread (cProfile, own time):\n" + format_table(
            profile, [("function", "function"), ("calls", "calls"), ("ms_per_image", "ms/image"),
                      ("own_pct", "% of total")]))
    print(f"\nwrote {json_path} and {png_path}")
    if args.quick:
        print(SMOKE_NOTICE)


if __name__ == "__main__":
    main()
