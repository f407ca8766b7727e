#!/usr/bin/env python3
"""Check and time the GPU path in one call, on a bare GPU machine: needs only torch, torchvision, numpy and Pillow
(Python 3.10+). No TorchServe, no internet, nothing to install; pytest is optional (tests/test_gpu.py runs when
it is there). Every check reports "passed", "failed" or "skipped" with its figures; without CUDA every CUDA check
is "skipped", never "passed".

  torchserve_free  the engine's modules import without TorchServe
  light_imports    the engine and this script import with matplotlib, tqdm, scikit-image, requests, psutil,
                   yaml, jsonschema, pytest and TorchServe made unimportable
  device_parity    device decoder crops vs the CPU path, per set; baseline decoded there, progressive routed
  stream_race      the decoder while work is queued on the caller's stream, vs a CPU decode, and the bare
                   torchvision call as a control (does the race corrupt anything on this machine?)
  engine_chunks    requests larger than max_batch (chunks overlap): device-decode engine vs CPU-decode engine
  warm_up          the engine's start-up: model buckets, device-decoder warm-up and self-check
  out_of_memory    an OOM in one chunk costs only that chunk
  sticky_error     a device-side assert (in a child process) is reported as DeviceLost
  gpu_tests        pytest -m gpu tests/test_gpu.py
  compile          torch.compile (static shapes) warm-up of every bucket vs startupTimeout in model-config.yaml
Timings, per request larger than max_batch: (a) stock PIL + float, (b) DataLoader recipe, (c) engine with CPU
decode, (d) engine with device decode; ResNet-50 (random weights), fp16 channels_last on CUDA.

Images: baseline and progressive JPEGs, 500x375 and 12 MP; real photos from .cache/corpus when present,
drawn with numpy and Pillow otherwise. One JSON report goes to $OUT (or bench_results/). Exit code 0 when
every check that could run passed.

    python3 scripts/gpu_check.py            # on the GPU machine: everything (estimated 5-8 minutes, compile included)
    python3 scripts/gpu_check.py --quick    # fewer images and repeats, no compile; also runs on a CPU
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ENGINE_MODULES = ("handler.config", "handler.codecs", "handler.imaging", "handler.preprocess", "handler.device",
                  "handler.device_decode", "handler.engine", "handler.model")
HEAVY_MODULES = ("ts", "matplotlib", "tqdm", "skimage", "requests", "psutil", "yaml", "jsonschema",
                 "kubernetes_validate", "pytest")
TS_IMPORT = re.compile(r"^\s*(from|import)\s+ts(\.|\s|$)", re.MULTILINE)
# Provisional bound, as in tests/test_gpu.py: nvJPEG and libjpeg differ by a level here and there.
MAX_MEAN_LEVELS = 1.0
Check = dict[str, Any]


def passed(**figures: Any) -> Check:
    return {"status": "passed", **figures}


def failed(reason: str, **figures: Any) -> Check:
    return {"status": "failed", "reason": reason, **figures}


def skipped(reason: str) -> Check:
    return {"status": "skipped", "reason": reason}


def judged(ok: bool, reason: str, **figures: Any) -> Check:
    return passed(**figures) if ok else failed(reason, **figures)


class Context:
    """What the checks share: device, corpus, model, spec, and the sizes chosen by --quick."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from gpu_corpus import load_corpus

        self.quick = args.quick
        self.images = args.images or (8 if args.quick else 32)
        self.max_batch = args.max_batch or (3 if args.quick else 8)
        self.repeats = args.repeats or (2 if args.quick else 5)
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.precision = "fp16" if self.cuda else "fp32"
        started = time.perf_counter()
        self.corpus = load_corpus(small=self.images, large=min(self.images, 4 if args.quick else 8))
        self.corpus_seconds = time.perf_counter() - started
        self._model = None

    def model(self):
        """ResNet-50 with seeded random weights, in the precision and memory format the handler uses."""
        if self._model is None:
            import torch

            from handler.architectures import build_architecture

            torch.manual_seed(0)
            dtype = torch.float16 if self.precision == "fp16" else torch.float32
            self._model = (build_architecture("resnet50", 1000).eval().to(self.device, dtype)
                           .to(memory_format=torch.channels_last))
        return self._model

    def config(self, **overrides: Any):
        from handler.config import HandlerConfig

        values = {"device": self.device.type, "precision": self.precision, "max_batch": self.max_batch,
                  "warmup": False, "decode_device": "cuda" if self.cuda else "cpu"}
        return HandlerConfig(**{**values, **overrides})

    def engine(self, **overrides: Any):
        from handler.engine import InferenceEngine

        return InferenceEngine(self.config(**overrides), self.model(), self.device)

    def full_decode_spec(self):
        from handler.imaging import TransformSpec

        return TransformSpec(resize_size=256, crop_size=224, max_image_pixels=50_000_000, allowed_formats=("JPEG",),
                             reduced_jpeg_decode=False)


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    from handler.device_decode import default_backend

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_runtime": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "no CUDA",
        "jpeg_backend": default_backend().name, "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter that imports from the repository and scripts/."""
    path = os.pathsep.join(str(folder) for folder in (REPO, REPO / "scripts"))
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)


LOADED_TS_CHILD = """
import importlib, sys

for name in sys.argv[1].split(","):
    importlib.import_module(name)
print(",".join(sorted(m for m in sys.modules if m == "ts" or m.startswith("ts."))))
"""


def check_torchserve_free() -> Check:
    """Import the engine in a fresh interpreter (the caller may have imported TorchServe itself, e.g. under pytest)
    and list what of TorchServe got loaded; also look for import lines in the sources."""
    sources = {name: (REPO / (name.replace(".", "/") + ".py")).read_text() for name in ENGINE_MODULES}
    static = [name for name, source in sources.items() if TS_IMPORT.search(source)]
    child = run_child(LOADED_TS_CHILD, ",".join(ENGINE_MODULES))
    loaded = [m for m in child.stdout.strip().split(",") if m]
    return judged(child.returncode == 0 and not static and not loaded, "an engine module imports TorchServe",
                  modules_importing_ts=static, ts_modules_loaded=loaded, stderr_tail=child.stderr[-2000:])


BLOCKED_IMPORTS_CHILD = """
import importlib, sys

for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: import raises ImportError, find_spec answers None
for name in sys.argv[2].split(","):
    importlib.import_module(name)
"""


def check_light_imports() -> Check:
    """Import the engine and everything this script imports in a child process where the heavy modules are missing
    (torch imports some of them optionally when they happen to be installed, so sys.modules here proves nothing)."""
    modules = (*ENGINE_MODULES, "gpu_corpus", "baselines", "bench_common", "reference")
    child = run_child(BLOCKED_IMPORTS_CHILD, ",".join(HEAVY_MODULES), ",".join(modules))
    return judged(child.returncode == 0, "needs a module a bare GPU box lacks", blocked=HEAVY_MODULES,
                  imported=modules, stderr_tail=child.stderr[-2000:])


def levels_against_cpu_path(crops: Sequence[Any], payloads: Sequence[bytes], spec) -> list[float]:
    """Mean absolute level difference of each decoded crop from the CPU path's crop (routed crops are skipped)."""
    import numpy as np
    import torch

    from handler.imaging import decode_and_transform

    means = []
    for crop, payload in zip(crops, payloads, strict=True):
        if crop is not None:
            expected = torch.from_numpy(np.array(decode_and_transform(payload, spec))).float()
            means.append((crop.cpu().float() - expected).abs().mean().item())
    return means


def decode_in_slices(decoder, payloads: Sequence[bytes], size: int) -> list[Any]:
    return [crop for start in range(0, len(payloads), size) for crop in decoder.decode(payloads[start: start + size])]


def check_device_parity(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    from handler.device_decode import DeviceJpegDecoder

    spec = ctx.full_decode_spec()
    decoder = DeviceJpegDecoder(spec, ctx.device)
    figures, problems = {"backend": decoder.backend.name}, []
    for name, payloads in ctx.corpus.sets.items():
        crops = decode_in_slices(decoder, payloads, ctx.max_batch)
        routed = sum(crop is None for crop in crops)
        means = levels_against_cpu_path(crops, payloads, spec)
        figures[name] = {"images": len(payloads), "routed_to_cpu": routed,
                         "worst_mean_levels_vs_cpu_path": max(means, default=None)}
        if name.startswith("progressive") and routed != len(payloads):
            problems.append(f"{name}: {len(payloads) - routed} progressive JPEGs went to the device")
        if name.startswith("baseline") and routed:
            problems.append(f"{name}: {routed} baseline JPEGs were routed to the CPU")
        if means and max(means) > MAX_MEAN_LEVELS:
            problems.append(f"{name}: {max(means):.2f} levels from the CPU path on average")
    return judged(not problems, "; ".join(problems), **figures)


def queue_work_and_free(shapes: list[tuple[int, ...]]) -> tuple[list[Any], list[int]]:
    """On the caller's stream: ~50 ms of work, then one reduction per tensor; the tensors are freed while the
    reductions are still queued, so their blocks are free for the next allocation on that stream."""
    import torch

    victims = [torch.full(shape, 7, dtype=torch.uint8, device="cuda") for shape in shapes]
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(100_000_000)
    else:
        spin = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):
            spin = torch.tanh(spin @ spin)
    sums = [victim.sum(dtype=torch.int64) for victim in victims]
    return sums, [7 * victim.numel() for victim in victims]


def decoded_shapes(payloads: Sequence[bytes]) -> list[tuple[int, int, int]]:
    from PIL import Image

    return [(3, *Image.open(io.BytesIO(payload)).size[::-1]) for payload in payloads]


def check_stream_race(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from handler.device_decode import DeviceJpegDecoder, torchvision_backend

    payloads = ctx.corpus.sets["baseline 500x375"][: max(ctx.max_batch, 4)]
    shapes = decoded_shapes(payloads)
    spec = ctx.full_decode_spec()
    decoder = DeviceJpegDecoder(spec, ctx.device)
    iterations = 10 if ctx.quick else 50
    ours = {"corrupted_reductions": 0, "corrupted_crops": 0, "routed": 0}
    for _ in range(iterations):
        sums, expected = queue_work_and_free(shapes)
        crops = decoder.decode(payloads)
        ours["corrupted_reductions"] += [int(total) for total in sums] != expected
        ours["routed"] += sum(crop is None for crop in crops)
        means = levels_against_cpu_path(crops, payloads, spec)
        ours["corrupted_crops"] += any(mean > 4 * MAX_MEAN_LEVELS for mean in means)
    cpu_images = [decode_jpeg(torch.frombuffer(bytearray(p), dtype=torch.uint8), mode=ImageReadMode.RGB)
                  for p in payloads]
    bare = torchvision_backend()  # the unguarded call on the caller's stream: the control
    control = {"corrupted_reductions": 0, "corrupted_images": 0}
    for _ in range(iterations):
        sums, expected = queue_work_and_free(shapes)
        images = bare.decode_batch([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads], ctx.device)
        control["corrupted_reductions"] += [int(total) for total in sums] != expected
        control["corrupted_images"] += any((image.cpu().float() - reference.float()).abs().mean().item() > 4
                                           for image, reference in zip(images, cpu_images, strict=True))
    torch.cuda.synchronize()
    clean = not ours["corrupted_reductions"] and not ours["corrupted_crops"] and not ours["routed"]
    reproduced = bool(control["corrupted_reductions"] or control["corrupted_images"])
    return judged(clean, "the decoder corrupted memory or crops under queued work", iterations=iterations,
                  backend=decoder.backend.name, ours=ours, control_bare_torchvision=control,
                  race_reproduced_by_control=reproduced,
                  note=None if reproduced else "the control did not corrupt here: the fix is not proven by this run")


def top1_within_top5(left: Sequence[Any], right: Sequence[Any]) -> tuple[int, int]:
    """(images whose top-1 on one side is in the other's top-5, images compared)."""
    from handler.codecs import ImageError

    pairs = [(a, b) for a, b in zip(left, right, strict=True)
             if not isinstance(a, ImageError) and not isinstance(b, ImageError)]
    return sum(a[0][0] in [index for index, _ in b] for a, b in pairs), len(pairs)


def mixed_request(ctx: Context) -> list[bytes]:
    """Baseline and progressive small JPEGs, a 12 MP JPEG, a PNG and a corrupt file, ``ctx.images`` in all."""
    from gpu_corpus import photo_like

    png = io.BytesIO()
    photo_like((640, 480), 3).save(png, "PNG")
    sets = ctx.corpus.sets
    extras = [sets["progressive 500x375"][0], sets["baseline 12 MP"][0], png.getvalue(), b"\xff\xd8\xff broken"]
    return (extras + sets["baseline 500x375"])[: ctx.images]


def check_engine_chunks(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    from handler.codecs import ImageError

    payloads = mixed_request(ctx)
    on_device, on_cpu = ctx.engine(), ctx.engine(decode_device="cpu")
    ours, theirs = on_device.predict(payloads), on_cpu.predict(payloads)
    on_device.close()
    on_cpu.close()
    same_errors = [isinstance(r, ImageError) for r in ours] == [isinstance(r, ImageError) for r in theirs]
    agreeing, compared = top1_within_top5(ours, theirs)
    return judged(same_errors and agreeing >= 0.95 * compared, "the device-decode engine disagrees with the "
                  "CPU-decode engine", images=len(payloads), max_batch=ctx.max_batch, same_errors=same_errors,
                  top1_within_other_top5=f"{agreeing}/{compared}")


def check_warm_up(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    engine = ctx.engine(max_batch=32)
    started = time.perf_counter()
    sizes = engine.warm_up()
    seconds = time.perf_counter() - started
    kept = engine.device_decoder is not None
    engine.close()
    return judged(kept, "the device decoder failed its start-up self-check", buckets=sizes, seconds=seconds,
                  device_decoder_kept=kept)


def check_out_of_memory(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    import torch

    from handler.codecs import ImageError
    from handler.engine import InferenceEngine

    model, calls = ctx.model(), []

    def runs_out_of_memory_once(images):
        calls.append(1)
        if len(calls) == 2:
            torch.empty(1 << 46, dtype=torch.uint8, device=ctx.device)  # 64 TiB
        return model(images)

    engine = InferenceEngine(ctx.config(max_batch=2), runs_out_of_memory_once, ctx.device)
    payloads = ctx.corpus.sets["baseline 500x375"][:5]
    first = [isinstance(result, ImageError) for result in engine.predict(payloads)]
    second = [isinstance(result, ImageError) for result in engine.predict(payloads)]
    engine.close()
    expected = [False, False, True, True, False]
    return judged(first == expected and not any(second), "an out-of-memory chunk was not contained",
                  errors_first_request=first, errors_next_request=second)


STICKY_CHILD = """
import torch
from handler.config import HandlerConfig
from handler.device import DeviceLost
from handler.engine import InferenceEngine
from gpu_corpus import encode, photo_like

def indexes_out_of_bounds(images):
    return torch.zeros(4, 1000, device="cuda")[torch.full((images.shape[0],), 1 << 20, device="cuda")]

config = HandlerConfig(device="cuda", max_batch=2, warmup=False)
engine = InferenceEngine(config, indexes_out_of_bounds, torch.device("cuda"))
try:
    engine.predict([encode(photo_like((500, 375), seed)) for seed in range(3)])
except DeviceLost as lost:
    print("DEVICE_LOST", lost)
"""


def check_sticky_error(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    path = os.pathsep.join(str(folder) for folder in (REPO, REPO / "scripts"))
    child = subprocess.run([sys.executable, "-c", STICKY_CHILD], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": path}, timeout=300)
    lost = "DEVICE_LOST" in child.stdout
    return judged(lost, "a device-side assert was not reported as DeviceLost", returncode=child.returncode,
                  stdout_tail=child.stdout[-1500:], stderr_tail=child.stderr[-1500:])


def check_gpu_tests(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    if importlib.util.find_spec("pytest") is None:
        return skipped("pytest is not installed (the checks above cover the same ground)")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        return failed("the GPU tests ran past 420 s")
    output = (done.stdout + done.stderr).strip()
    return judged(done.returncode == 0, "some GPU tests failed", command=" ".join(command[1:]),
                  summary=output.splitlines()[-1] if output else "", output_tail=output[-5000:])


def startup_timeout() -> int | None:
    """startupTimeout from model-config.yaml (read with a regex: no yaml package here)."""
    found = re.search(r"^startupTimeout:\s*(\d+)", (REPO / "model-config.yaml").read_text(), re.MULTILINE)
    return int(found.group(1)) if found else None


def check_compile(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("no CUDA")
    if ctx.quick:
        return skipped("--quick")
    import torch

    from handler.architectures import build_architecture
    from handler.engine import InferenceEngine
    from handler.model import compile_or_eager

    torch.manual_seed(0)
    eager = build_architecture("resnet50", 1000).eval().to(ctx.device, torch.float16)
    model = compile_or_eager(eager.to(memory_format=torch.channels_last), enabled=True)
    engine = InferenceEngine(ctx.config(max_batch=32, compile=True), model, ctx.device)
    started = time.perf_counter()
    sizes = engine.warm_up()
    seconds = time.perf_counter() - started
    engine.close()
    limit = startup_timeout()
    return judged(limit is not None and seconds < limit, "compile + warm-up exceed startupTimeout", buckets=sizes,
                  compile_and_warm_up_seconds=seconds, startup_timeout_seconds=limit,
                  note="one worker, compile cache empty; workers starting together on one GPU take longer")


def time_methods(ctx: Context) -> list[dict[str, Any]]:
    """ms per request and images/s for each way of serving one request of ``ctx.images`` images."""
    import torch
    from baselines import recipe_batch, stock_batch
    from bench_common import time_call
    from reference import eval_transform

    model = ctx.model()
    transform = eval_transform()  # the ImageNet numbers of the ResNet-50 it times
    dtype = next(model.parameters()).dtype

    def classify(batch: torch.Tensor) -> list[int]:
        with torch.inference_mode():
            return model(batch.to(dtype).contiguous(memory_format=torch.channels_last)).argmax(1).tolist()

    engines = {"(c) engine, CPU decode (thread pool)": ctx.engine(decode_device="cpu")}
    if ctx.cuda:
        engines["(d) engine, device decode"] = ctx.engine()
    workers = min(4, os.cpu_count() or 1)
    methods: dict[str, Callable[[Sequence[bytes]], object]] = {
        "(a) stock PIL + float, sequential": lambda p: classify(stock_batch(p, ctx.device, transform=transform)),
        "(b) DataLoader recipe, per request": lambda p: classify(recipe_batch(p, ctx.device, workers,
                                                                               transform=transform)),
        **{name: engine.predict for name, engine in engines.items()},
    }
    rows = []
    for set_name in ("baseline 500x375", "baseline 12 MP", "progressive 12 MP"):
        payloads = ctx.corpus.sets[set_name]
        for name, method in methods.items():
            method(payloads)  # warm-up
            samples = [time_call(lambda method=method, payloads=payloads: method(payloads), ctx.device)
                       for _ in range(ctx.repeats)]
            p50 = statistics.median(samples)
            row = {"set": set_name, "method": name, "images": len(payloads), "max_batch": ctx.max_batch,
                   "p50_ms": 1000 * p50, "min_ms": 1000 * min(samples), "images_per_s": len(payloads) / p50,
                   "repeats": ctx.repeats}
            engine = engines.get(name)
            if engine is not None:
                row["last_call"] = {"decode_wait_ms": 1000 * engine.last_timings.decode_wait,
                                    "inference_ms": 1000 * engine.last_timings.inference}
            rows.append(row)
            print(f"  {set_name:<20} {name:<40} {row['p50_ms']:>9.1f} ms {row['images_per_s']:>8.1f} img/s")
    if not ctx.cuda:
        rows.append({"method": "(d) engine, device decode", "status": "skipped", "reason": "no CUDA"})
    for engine in engines.values():
        engine.close()
    return rows


def write_report(report: dict[str, Any]) -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench_results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images per request, max_batch 3, 2 repeats, no compile")
    parser.add_argument("--images", type=int, help="images per request (default 32; 8 with --quick)")
    parser.add_argument("--max-batch", type=int, help="images per forward (default 8; 3 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed requests per method (default 5; 2 with --quick)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*TorchCodec.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
    began = time.perf_counter()

    report: dict[str, Any] = {"environment": environment(), "arguments": vars(args), "checks": {}}
    print(json.dumps(report["environment"], indent=2))
    checks = report["checks"]
    checks["torchserve_free"] = check_torchserve_free()
    checks["light_imports"] = check_light_imports()
    for name in checks:
        print(f"{name:<16} {checks[name]['status']:<8} {checks[name].get('reason', '')}")
    ctx = Context(args)
    report["corpus"] = {"source": ctx.corpus.source, "seconds": ctx.corpus_seconds,
                        "sets": {name: len(payloads) for name, payloads in ctx.corpus.sets.items()}}
    for name, check in (("device_parity", check_device_parity), ("stream_race", check_stream_race),
                        ("engine_chunks", check_engine_chunks), ("warm_up", check_warm_up),
                        ("out_of_memory", check_out_of_memory), ("sticky_error", check_sticky_error),
                        ("gpu_tests", check_gpu_tests), ("compile", check_compile)):
        started = time.perf_counter()
        try:
            checks[name] = check(ctx)
        except Exception as error:  # a check that crashes is a failed check; the others still run
            checks[name] = failed(f"raised {error!r}")
        checks[name]["seconds"] = time.perf_counter() - started
        print(f"{name:<16} {checks[name]['status']:<8} {checks[name].get('reason', '')}")
    print(f"\ntimings ({ctx.images} images per request, max_batch {ctx.max_batch}, {ctx.device.type}):")
    report["timings"] = time_methods(ctx)
    statuses = [check["status"] for check in checks.values()]
    report["summary"] = {status: statuses.count(status) for status in ("passed", "failed", "skipped")}
    report["elapsed_s"] = time.perf_counter() - began
    path = write_report(report)
    print(f"\n{report['summary']}")
    print(f"report written to {path} ({report['elapsed_s']:.0f} s)")
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
