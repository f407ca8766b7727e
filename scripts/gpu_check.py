#!/usr/bin/env python3
"""Check and time the GPU fast path in one call, on a lent GPU machine (no TorchServe, no internet).

1. Imports the server-independent handler modules and checks that none of them pulls in TorchServe.
2. Makes the image corpus with scripts/make_corpus.py (needs scikit-image).
3. Runs the GPU tests (``pytest -m gpu``) of every test file that does not need TorchServe.
4. Parity of the device decoder against the CPU reference: normalized tensors and top-1 agreement.
5. Times 32-image requests (ImageNet-size and 12 MP JPEGs), ResNet-50 fp16 channels_last (random
   weights): (a) stock: PIL + float transforms one by one, then .cuda(); (b) the DataLoader recipe,
   built per request; (a) and (b) are the very functions scripts/bench_preprocess.py times; (c) the
   engine with CPU decode (thread pool); (d) DeviceJpegDecoder + normalize + model, with CUDA-event
   stage times; (e) on CUDA, the engine with decode_device: cuda (what the handler does by default).

Prints a table and writes JSON to $OUT (or bench_results/). Without CUDA it still runs everything on the
CPU (fp32, no GPU tests) so the script itself can be checked:

    python3 scripts/gpu_check.py            # on the GPU machine
    python3 scripts/gpu_check.py --quick    # few images and repeats; fine on a CPU-only machine
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

ENGINE_MODULES = ("handler.config", "handler.codecs", "handler.imaging", "handler.preprocess", "handler.engine",
                  "handler.model", "handler.device_decode")
TS_IMPORT = re.compile(r"^\s*(from|import)\s+ts(\.|\s|$)", re.MULTILINE)
Method = Callable[[Sequence[bytes]], list[int]]  # payloads -> top-1 class per image

warnings.filterwarnings("ignore", message=".*TorchCodec.*", category=DeprecationWarning)

from bench_common import time_call  # noqa: E402  (the same clock as the benchmarks: synchronized on CUDA)
from bench_preprocess import recipe_batch, stock_batch  # noqa: E402  (one definition of stock and recipe)


def check_no_torchserve() -> dict[str, object]:
    """Import the engine's modules; TorchServe must not appear in sys.modules or in their imports."""
    for name in ENGINE_MODULES:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m == "ts" or m.startswith("ts."))
    static = [name for name in ENGINE_MODULES
              if TS_IMPORT.search((REPO / (name.replace(".", "/") + ".py")).read_text())]
    return {"ok": not loaded and not static, "ts_modules_loaded": loaded, "modules_importing_ts": static}


def load_corpus(imagenet: int, phone: int) -> dict[str, list[bytes]]:
    try:
        import skimage  # noqa: F401  (make_corpus reads the photos bundled with it)
    except ImportError:
        sys.exit("FAIL: scikit-image is needed to make the corpus (its bundled photos): pip install scikit-image")
    from make_corpus import write_corpus

    corpus = write_corpus(REPO / ".cache" / "corpus")  # the tests' defaults, so both share one corpus
    read = lambda folder, count: [p.read_bytes() for p in sorted((corpus / folder).glob("*.jpg"))[:count]]  # noqa: E731
    return {"imagenet 500x375": read("imagenet", imagenet), "phone 12 MP": read("phone", phone)}


def run_gpu_tests(cuda: bool) -> dict[str, object]:
    if not cuda:
        print("SKIP GPU tests: CUDA is not available here (pytest -m gpu would skip every one).")
        return {"ran": False, "reason": "no CUDA"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("SKIP GPU tests: pytest is not installed (pip install pytest)")
        return {"ran": False, "reason": "pytest not installed"}
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if not TS_IMPORT.search(p.read_text()))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-s", "-p", "no:cacheprovider", *files]
    print("$", " ".join(command))
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        print("FAIL: the GPU tests ran past 400 s")
        return {"ran": True, "returncode": "timeout"}
    output = done.stdout + done.stderr
    print(output[-6000:])
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return {"ran": True, "returncode": done.returncode, "summary": summary, "files": files,
            "output_tail": output[-6000:]}


def build_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from handler.model import build_architecture

    torch.manual_seed(0)
    model = build_architecture("resnet50", 1000).eval()
    return model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def top1(model: torch.nn.Module, batch: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        return model(batch).argmax(dim=1).tolist()


class Methods:
    """The four ways to serve one request, sharing one model."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, batch: int) -> None:
        from handler.config import HandlerConfig
        from handler.device_decode import DeviceJpegDecoder
        from handler.engine import InferenceEngine
        from handler.preprocess import transform_spec

        precision = "fp16" if dtype == torch.float16 else "fp32"
        common = {"device": device.type, "precision": precision, "max_batch": batch, "warmup": False}
        self.model, self.device, self.dtype = model, device, dtype
        self.recipe_workers = min(4, os.cpu_count() or 1)
        self.threads = InferenceEngine(HandlerConfig(decode_device="cpu", **common), model, device)
        self.on_device = (InferenceEngine(HandlerConfig(decode_device="cuda", **common), model, device)
                          if device.type == "cuda" else None)
        self.spec = transform_spec(self.threads.config)
        self.decoder = DeviceJpegDecoder(self.spec, device)
        self.routed = 0
        self.stage_ms: dict[str, list[float]] = {"decode+resize": [], "normalize+model": []}

    def all(self) -> dict[str, Method]:
        methods = {"(a) stock PIL+float, sequential": self.stock,
                   "(b) DataLoader recipe, per request": self.recipe,
                   "(c) engine, thread pool (CPU decode)": lambda p: self._engine(self.threads, p),
                   "(d) device decoder + normalize + model": self.device_decode}
        if self.on_device is not None:
            methods["(e) engine, decode_device: cuda"] = lambda p: self._engine(self.on_device, p)
        return methods

    def _classify(self, batch: torch.Tensor) -> list[int]:
        return top1(self.model, batch.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def stock(self, payloads: Sequence[bytes]) -> list[int]:
        return self._classify(stock_batch(payloads, self.device))

    def recipe(self, payloads: Sequence[bytes]) -> list[int]:
        return self._classify(recipe_batch(payloads, self.device, self.recipe_workers))

    @staticmethod
    def _engine(engine, payloads: Sequence[bytes]) -> list[int]:
        return [result[0][0] for result in engine.predict(payloads, topk=1)]

    def device_batch(self, payloads: Sequence[bytes]) -> torch.Tensor:
        """NHWC uint8 on the device: the decoder's crops, and the CPU path for what it routes."""
        from handler.imaging import decode_and_transform

        crops = self.decoder.decode(payloads)
        rows = []
        for payload, crop in zip(payloads, crops, strict=True):
            if crop is None:
                self.routed += 1
                crop = torch.from_numpy(np.array(decode_and_transform(payload, self.spec))).to(self.device)
            rows.append(crop)
        return torch.stack(rows)

    def device_decode(self, payloads: Sequence[bytes]) -> list[int]:
        if self.device.type != "cuda":
            return top1(self.model, self.threads.normalize(self.device_batch(payloads)))
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        batch = self.device_batch(payloads)
        middle.record()
        result = top1(self.model, self.threads.normalize(batch))
        end.record()
        end.synchronize()
        self.stage_ms["decode+resize"].append(start.elapsed_time(middle))
        self.stage_ms["normalize+model"].append(middle.elapsed_time(end))
        return result

    def close(self) -> None:
        self.threads.close()
        if self.on_device is not None:
            self.on_device.close()


def time_method(method: Method, payloads: Sequence[bytes], device: torch.device, warmup: int,
                repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        method(payloads)
    latencies = [time_call(lambda: method(payloads), device) for _ in range(repeats)]
    p50 = statistics.median(latencies)
    return {"p50_ms": 1000 * p50, "min_ms": 1000 * min(latencies), "images_per_s": len(payloads) / p50,
            "repeats": repeats}


def parity(methods: Methods, cpu_model: torch.nn.Module, payloads: Sequence[bytes]) -> dict[str, float]:
    """The device path (decode on the device, model in its precision) against the all-CPU float reference."""
    from reference import reference_tensor

    from handler.imaging import decode_and_transform

    reference = torch.stack([reference_tensor(p) for p in payloads])
    to_normalized = lambda nhwc: methods.threads.normalize(nhwc.to(methods.device)).float().cpu()  # noqa: E731
    device_inputs = to_normalized(methods.device_batch(payloads))
    cpu_path = to_normalized(torch.from_numpy(np.stack([decode_and_transform(p, methods.spec) for p in payloads])))
    reference_top1 = top1(cpu_model, reference.contiguous(memory_format=torch.channels_last))
    agreement = lambda other: sum(a == b for a, b in zip(reference_top1, other, strict=True)) / len(payloads)  # noqa: E731
    on_device = lambda inputs: top1(methods.model, inputs.to(methods.device, methods.dtype)  # noqa: E731
                                    .contiguous(memory_format=torch.channels_last))
    return {
        "max_abs_normalized_device_decoder_vs_reference": (device_inputs - reference).abs().max().item(),
        "mean_abs_normalized_device_decoder_vs_reference": (device_inputs - reference).abs().mean().item(),
        "max_abs_normalized_cpu_path_vs_reference": (cpu_path - reference).abs().max().item(),
        "top1_agreement_device_path_vs_cpu_fp32_reference": agreement(on_device(device_inputs)),
        "top1_agreement_reference_inputs_device_model_vs_cpu_fp32": agreement(on_device(reference)),
    }


def write_results(results: dict[str, object]) -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench_results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def print_table(timings: list[dict[str, object]]) -> None:
    print(f"\n{'corpus':<18} {'method':<40} {'p50 ms/request':>15} {'images/s':>10}")
    for row in timings:
        print(f"{row['corpus']:<18} {row['method']:<40} {row['p50_ms']:>15.1f} {row['images_per_s']:>10.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images per request, 1 warm-up, 3 repeats")
    parser.add_argument("--images", type=int, help="images per request (default 32; 8 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed requests per method (default 15; 3 with --quick)")
    args = parser.parse_args()
    images = args.images or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3
    began = time.perf_counter()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    import torchvision

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'unknown'})",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "images_per_request": images, "repeats": repeats,
        "precision": "fp16" if cuda else "fp32", "skipped": [],
    }
    print(f"device: {results['device']}; torch {torch.__version__}; torchvision {torchvision.__version__}")
    if not cuda:
        note = "no CUDA: fp32 on the CPU, GPU tests and CUDA timings skipped; CPU numbers only prove the script runs"
        print(f"NOTE: {note}")
        results["skipped"].append(note)  # type: ignore[union-attr]

    ts_check = check_no_torchserve()
    results["torchserve_free"] = ts_check
    print(f"engine modules free of TorchServe: {'OK' if ts_check['ok'] else 'FAIL ' + json.dumps(ts_check)}")

    corpus = load_corpus(images, images)
    results["gpu_tests"] = run_gpu_tests(cuda)

    model = build_model(device, dtype)
    cpu_model = build_model(torch.device("cpu"), torch.float32) if cuda else copy.deepcopy(model)
    methods = Methods(model, device, dtype, images)
    results["parity"] = {name: parity(methods, cpu_model, payloads) for name, payloads in corpus.items()}
    del cpu_model
    print(json.dumps(results["parity"], indent=2))

    timings = []
    for corpus_name, payloads in corpus.items():
        for method_name, method in methods.all().items():
            methods.routed = 0
            row = {"corpus": corpus_name, "method": method_name,
                   **time_method(method, payloads, device, warmup, repeats)}
            if method_name.startswith("(d)"):
                row["routed_to_cpu_per_request"] = methods.routed / (warmup + repeats)
                row["gpu_stage_median_ms"] = {k: statistics.median(v) for k, v in methods.stage_ms.items() if v}
                for samples in methods.stage_ms.values():
                    samples.clear()
            timings.append(row)
            print(f"  {corpus_name}: {method_name}: p50 {row['p50_ms']:.1f} ms")
    methods.close()
    results["timings"] = timings
    results["elapsed_s"] = time.perf_counter() - began
    print_table(timings)
    print(f"\nresults written to {write_results(results)} ({results['elapsed_s']:.0f} s)")

    failed = not ts_check["ok"] or (cuda and results["gpu_tests"].get("returncode") != 0)  # type: ignore[union-attr]
    routed = any(row.get("routed_to_cpu_per_request") for row in timings)
    if routed:
        print("WARNING: the device decoder routed good JPEGs to the CPU path (see routed_to_cpu_per_request)")
    return 1 if failed or routed else 0


if __name__ == "__main__":
    sys.exit(main())
