#!/usr/bin/env python3
"""The model step alone, backend x precision, side by side: images/s and answers against eager fp32.

For each model (the trained demo, and ResNet-50 with seeded random weights for speed only) and each model step
(eager NCHW, eager channels_last — the old default —, inductor with freezing, OpenVINO; fp32 and, where the CPU
has native bf16 or --bf16 forces it, bf16), this times the forward of one batch of normalized tensors in
interleaved rounds (every step once per round, so machine noise hits all of them alike) and reports the median.
Accuracy (demo only): top-1 agreement and the largest top-5 probability shift against eager fp32 on the corpus's
ImageNet-size photos, preprocessed by the engine. The CPU model and flags are recorded with the results.

    python bench/bench_model_step.py                    # demo + ResNet-50, batch 16, all cores (~10 min on 2)
    python bench/bench_model_step.py --threads 1 2 --models demo
    python bench/bench_model_step.py --quick            # a smoke run that says so
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # importing torch takes seconds: say so first
    print(f"{Path(__file__).name}: loading torch, timm and the handler ...", file=sys.stderr, flush=True)

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from bench_common import (
    DEFAULT_OUT,
    SMOKE_NOTICE,
    ensure_corpus,
    format_table,
    load_set,
    machine_info,
    step,
    write_json,
)
from build_mar import DEMO_ARCH, bundled_state_dict

from handler.architectures import build_architecture
from handler.backends import (
    ModelStep,
    compare,
    cpu_flags,
    eager_step,
    has_native_bf16,
    inductor_step,
    openvino_step,
    run_in_chunks,
)
from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.outputs import split_classifier

CPU = torch.device("cpu")
DEMO_PREPROCESSING = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic", "mean": (0.5,) * 3,
                      "std": (0.5,) * 3}


def load_models(names: Sequence[str]) -> dict[str, torch.nn.Module]:
    models = {}
    if "demo" in names:
        demo = build_architecture(DEMO_ARCH, 1000).eval()
        demo.load_state_dict(bundled_state_dict(DEMO_ARCH, demo)[0])
        models["demo"] = split_classifier(demo, 1000)
    if "resnet50" in names:
        torch.manual_seed(0)
        models["resnet50"] = split_classifier(build_architecture("resnet50", 1000).eval(), 1000)
    return models


def step_factories(model: torch.nn.Module, backends: Sequence[str], precisions: Sequence[str], threads: int,
                   cache: Path, key: str) -> dict[str, Callable[[], ModelStep]]:
    factories: dict[str, Callable[[], ModelStep]] = {
        "eager fp32 NCHW": lambda: eager_step(model, "fp32", channels_last=False),
        "eager fp32 channels_last (old default)": lambda: eager_step(model, "fp32"),
    }
    for precision in precisions:
        if "inductor" in backends:
            factories[f"inductor+freezing {precision}"] = lambda p=precision: inductor_step(model, p, cache)
        if "openvino" in backends:
            factories[f"openvino {precision}"] = lambda p=precision: openvino_step(model, p, 224, threads, cache, key)
        if precision != "fp32":
            factories[f"eager {precision} channels_last"] = lambda p=precision: eager_step(model, p)
    return factories


def time_steps(steps: dict[str, ModelStep], batch: int, rounds: int) -> tuple[dict[str, list[float]],
                                                                             dict[str, float]]:
    """Per step: the timed rounds, and its first call (for inductor, the compile of this shape)."""
    images = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    first_call: dict[str, float] = {}
    with torch.inference_mode():
        for name, model_step in steps.items():
            started = time.perf_counter()
            model_step(images)
            first_call[name] = time.perf_counter() - started
            model_step(images)
        for _ in range(rounds):
            for name, model_step in steps.items():
                started = time.perf_counter()
                model_step(images)
                samples[name].append(time.perf_counter() - started)
    return samples, first_call


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["demo", "resnet50"], default=["demo", "resnet50"])
    parser.add_argument("--backends", nargs="+", choices=["eager", "inductor", "openvino"],
                        default=["eager", "inductor", "openvino"], help="eager is always timed (the baselines)")
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (median reported)")
    parser.add_argument("--accuracy-images", type=int, default=64, help="corpus photos for the demo's agreement")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 on a CPU without native bf16 "
                                                           "(emulated: slow, shows nothing about a bf16 CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 8 photos")
    args = parser.parse_args(argv)
    if args.quick:
        print(SMOKE_NOTICE, flush=True)
        args.rounds, args.accuracy_images = 2, 8
    machine = machine_info()
    flags = cpu_flags()
    native = has_native_bf16(flags)
    precisions = ["fp32", "bf16"] if native or args.bf16 else ["fp32"]
    ensure_corpus()
    rows: list[dict[str, Any]] = []
    with step("loading the models", expected_s=5):
        models = load_models(args.models)
    cache = Path(tempfile.mkdtemp(prefix="model-step-bench-"))  # a cold cache: conversions are timed too
    for model_name, model in models.items():
        for threads in args.threads:
            torch.set_num_threads(threads)
            steps, build_s = {}, {}
            for name, factory in step_factories(model, args.backends, precisions, threads, cache,
                                                model_name).items():
                with step(f"{model_name}, {threads} thread(s): building {name}", expected_s=20):
                    started = time.perf_counter()
                    try:
                        steps[name] = factory()
                    except Exception as error:  # a backend missing here is a row that says so
                        rows.append({"model": model_name, "threads": threads, "step": name, "error": repr(error)})
                        continue
                    build_s[name] = time.perf_counter() - started
            with step(f"{model_name}, {threads} thread(s): {args.rounds} interleaved rounds of batch {args.batch}",
                      expected_s=args.rounds * len(steps)):
                samples, first_call = time_steps(steps, args.batch, args.rounds)
            agreements = {}
            if model_name == "demo" and args.accuracy_images:
                config = HandlerConfig(**DEMO_PREPROCESSING, max_batch=args.batch, decode_threads=threads)
                engine = InferenceEngine(config, model, CPU)
                photos = engine.normalized(load_set("imagenet", args.accuracy_images))
                engine.close()
                with torch.inference_mode():
                    reference = run_in_chunks(eager_step(model, "fp32"), photos, args.batch)
                    agreements = {name: compare(reference, run_in_chunks(s, photos, args.batch))
                                  for name, s in steps.items()}
            baseline = statistics.median(samples["eager fp32 channels_last (old default)"])
            for name, times in samples.items():
                median = statistics.median(times)
                row = {"model": model_name, "threads": threads, "step": name, "batch": args.batch,
                       "images_per_s": args.batch / median, "median_ms": 1e3 * median,
                       "over_old_default": baseline / median, "build_s": build_s[name] + first_call[name],
                       "served_precision": steps[name].precision}
                if name in agreements:
                    row.update({"top1": agreements[name].top1, "max_top5_shift": agreements[name].max_top5_shift,
                                "photos": agreements[name].images})
                rows.append(row)
    result = {"benchmark": "model_step", "quick": args.quick, "machine": machine,
              "cpu_flags": sorted(flags), "native_bf16": native, "settings": vars(args) | {"out": str(args.out)},
              "results": rows}
    path = write_json(args.out / "bench_model_step.json", result)
    print()
    print(f"CPU: {machine.get('cpu')}; native bf16: {'yes' if native else 'no'} "
          f"(flags {', '.join(sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'}))})")
    print(format_table([r for r in rows if "error" not in r], [
        ("model", "model"), ("threads", "threads"), ("step", "model step"),
        ("images_per_s", "images/s", f"batch {args.batch}, median of {args.rounds} interleaved rounds"),
        ("over_old_default", "x old default", "images/s over eager fp32 channels_last"),
        ("served_precision", "runs in", "the precision the backend reports it runs"),
        ("top1", "top-1", "agreement with eager fp32 on the photos (demo only)"),
        ("max_top5_shift", "max shift", "largest change of a top-5 probability against eager fp32"),
        ("build_s", "build s", "building the step with an empty cache, and its first call (inductor compiles then)")]))
    for row in rows:
        if "error" in row:
            print(f"  {row['model']}, {row['step']}: not available here ({row['error']})")
    print(f"\nwrote {path}")
    if args.quick:
        print(SMOKE_NOTICE)


if __name__ == "__main__":
    main()
