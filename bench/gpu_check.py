#!/usr/bin/env python3
"""Check and time the GPU path in one call, on a bare GPU machine: needs only torch, torchvision, numpy and Pillow
(Python 3.10+; timm too for the parity check on the demo's trained weights). No TorchServe, no internet, nothing to
install; pytest is optional (tests/test_gpu.py runs when it is there). Every check reports "passed", "failed",
"inconclusive" or "skipped" with its figures; without CUDA every CUDA check is "skipped", never "passed".

Order: the import checks, the timings, the device checks, compile last. The JSON report is rewritten after every
check, output is unbuffered, and --deadline ends the run in time whatever is running (the report then says where
it stopped): a short lease still returns every figure measured until then.

  torchserve_free  the engine's modules import without TorchServe
  light_imports    the engine and this script import with matplotlib, tqdm, scikit-image, requests, psutil,
                   yaml, jsonschema, pytest and TorchServe made unimportable
  timings          per request of --images images: (a) stock PIL + float, (b) DataLoader recipe, (c) engine with
                   CPU decode, (d) engine with device decode; ResNet-50 (random weights), fp16 channels_last on CUDA
  parity           the demo archive's trained weights (model_store/efficientnet_lite0.mar, or --archive): per image,
                   the embedding and the class probabilities of the device-decode engine against the CPU-decode
                   engine, on requests larger than max_batch with mixed formats. Without CUDA it runs the device
                   decoder on the CPU: that is how the bounds were measured
  device_parity    device decoder crops vs the CPU path, per set; baseline decoded there, progressive routed
  stream_race      the decoder while work is queued on the caller's stream, vs a CPU decode; the bare torchvision
                   call is the control: "inconclusive" when the control does not corrupt anything on this machine
  warm_up          the engine's start-up: model buckets, device-decoder warm-up and self-check
  out_of_memory    an OOM in one chunk costs only that chunk
  sticky_error     a device-side assert (in a child process) is reported as DeviceLost
  gpu_tests        pytest -m gpu tests/test_gpu.py
  compile          torch.compile (static shapes): compile + first run per bucket, against startupTimeout

Images: baseline and progressive JPEGs, 500x375 and 12 MP; real photos from .cache/corpus when present,
drawn with numpy and Pillow otherwise. The report goes to $OUT (or bench_results/). Exit code 0 when no check
failed.

    python3 bench/gpu_check.py            # on the GPU machine: everything within --deadline (default 450 s)
    python3 bench/gpu_check.py --quick    # fewer images and repeats, no compile; also runs on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
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
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# handler/ and tests.harness, the benchmark helpers, make_corpus.py, and the wire format the handler imports from the
# client package (client/, not installed on a bare GPU box)
IMPORT_PATH = (REPO, REPO / "bench", REPO / "scripts", REPO / "client")
for _path in IMPORT_PATH:
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ENGINE_MODULES = ("handler.config", "handler.codecs", "handler.imaging", "handler.preprocess", "handler.device",
                  "handler.device_decode", "handler.engine", "handler.model")
HEAVY_MODULES = ("ts", "matplotlib", "tqdm", "skimage", "requests", "psutil", "yaml", "jsonschema",
                 "kubernetes_validate", "pytest")
TS_IMPORT = re.compile(r"^\s*(from|import)\s+ts(\.|\s|$)", re.MULTILINE)
# Provisional bound, as in tests/test_gpu.py: nvJPEG and libjpeg differ by a level here and there.
MAX_MEAN_LEVELS = 1.0
DEFAULT_DEADLINE_S = 450  # fits an 8-minute window with room for start-up and the report
DEFAULT_ARCHIVE = REPO / "model_store" / "efficientnet_lite0.mar"
Check = dict[str, Any]


def passed(**figures: Any) -> Check:
    return {"status": "passed", **figures}


def failed(reason: str, **figures: Any) -> Check:
    return {"status": "failed", "reason": reason, **figures}


def skipped(reason: str) -> Check:
    return {"status": "skipped", "reason": reason}


def inconclusive(reason: str, **figures: Any) -> Check:
    return {"status": "inconclusive", "reason": reason, **figures}


def judged(ok: bool, reason: str, **figures: Any) -> Check:
    return passed(**figures) if ok else failed(reason, **figures)


class Context:
    """What the checks share: device, corpus, model, spec, and the sizes chosen by --quick."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from gpu_corpus import load_corpus

        self.quick = args.quick
        self.archive = Path(args.archive) if args.archive else DEFAULT_ARCHIVE
        self.images = args.images or (8 if args.quick else 32)
        self.max_batch = args.max_batch or (3 if args.quick else 8)
        self.cuda = torch.cuda.is_available()
        self.repeats = args.repeats or (5 if not args.quick else 2 if self.cuda else 1)
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.precision = "fp16" if self.cuda else "fp32"
        started = time.perf_counter()
        self.corpus = load_corpus(small=self.images, large=min(self.images, 2 if args.quick else 8))
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
    """Run a Python snippet in a fresh interpreter that imports from the repository as this script does."""
    path = os.pathsep.join(map(str, IMPORT_PATH))
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
    modules = (*ENGINE_MODULES, "gpu_corpus", "baselines", "bench_common", "tests.harness.reference")
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
    figures = {"iterations": iterations, "backend": decoder.backend.name, "ours": ours,
               "control_bare_torchvision": control, "race_reproduced_by_control": reproduced}
    if not clean:
        return failed("the decoder corrupted memory or crops under queued work", **figures)
    if not reproduced:
        return inconclusive("the control (the bare torchvision call) corrupted nothing on this machine either, so "
                            "this run cannot show that the decoder's own stream prevents the race", **figures)
    return passed(**figures)


def mixed_request(ctx: Context) -> list[bytes]:
    """Baseline and progressive small JPEGs, a 12 MP JPEG, a PNG and a corrupt file, ``ctx.images`` in all."""
    from gpu_corpus import photo_like

    png = io.BytesIO()
    photo_like((640, 480), 3).save(png, "PNG")
    sets = ctx.corpus.sets
    extras = [sets["progressive 500x375"][0], sets["baseline 12 MP"][0], png.getvalue(), b"\xff\xd8\xff broken"]
    return (extras + sets["baseline 500x375"])[: ctx.images]


# Parity bounds, measured with bench/gpu_check.py's CPU run (torchvision's CPU decoder + the device resize against
# the PIL path, full decode both, the demo's trained weights): see PARITY_MEASURED. nvJPEG is another JPEG
# implementation; these bounds hold it to what two CPU decoders differ by, with a margin, until a GPU run reports.
PARITY_MIN_COSINE = 0.995
PARITY_MAX_PROBABILITY_SHIFT = 0.05
PARITY_MEASURED = ("two CPU decoders (torchvision 0.29's libjpeg-turbo + the device resize, against PIL), demo weights,"
                   " a 32-image mixed request + 8 12 MP photos, max_batch 8: min cosine 0.9983, max probability shift "
                   "0.034, same top-1 38/39")


def load_archive(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """build_info.json and the state_dict of a model archive (.mar, a zip), read without TorchServe."""
    import torch

    with zipfile.ZipFile(path) as archive:
        info = json.loads(archive.read("build_info.json"))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        weights = archive.read(manifest["model"]["serializedFile"])
    return info, torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)


def archive_model(ctx: Context, info: dict[str, Any], state_dict: dict[str, Any]):
    import torch

    from handler.architectures import build_architecture
    from handler.outputs import split_classifier

    model = build_architecture(info["architecture"], info["num_classes"])
    model.load_state_dict(state_dict)
    model = split_classifier(model, info["num_classes"]) or model
    return model.eval().to(ctx.device).to(memory_format=torch.channels_last)


def dense(prediction: dict[str, Any], classes: int) -> list[float]:
    scores = [0.0] * classes
    for index, score in prediction["topk"]:
        scores[index] = score
    return scores


def compare_predictions(ours: Sequence[Any], theirs: Sequence[Any], classes: int) -> dict[str, Any]:
    """Per image: cosine of the two embeddings, largest class-probability difference, same top-1."""
    import torch

    from handler.codecs import ImageError

    cosines, shifts, same_top1 = [], [], 0
    for mine, other in zip(ours, theirs, strict=True):
        if isinstance(mine, ImageError) or isinstance(other, ImageError):
            continue
        a, b = torch.tensor(mine["embedding"]), torch.tensor(other["embedding"])
        cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
        shifts.append((torch.tensor(dense(mine, classes)) - torch.tensor(dense(other, classes))).abs().max().item())
        same_top1 += mine["topk"][0][0] == other["topk"][0][0]
    return {"images_compared": len(cosines), "min_embedding_cosine": min(cosines, default=None),
            "worst_image": cosines.index(min(cosines)) if cosines else None,
            "max_probability_shift": max(shifts, default=None), "same_top1": f"{same_top1}/{len(cosines)}"}


def check_parity(ctx: Context) -> Check:
    if not ctx.archive.exists():
        return skipped(f"no demo archive at {ctx.archive}: build it with scripts/build_mar.py (or pass --archive) "
                       f"and carry it with the tree")
    if importlib.util.find_spec("timm") is None:
        return skipped("timm is not installed (the demo archive holds a timm model)")
    import torch

    from handler.codecs import EMBEDDING, TOPK, ImageError
    from handler.config import HandlerConfig
    from handler.device_decode import DeviceJpegDecoder
    from handler.engine import InferenceEngine
    from handler.preprocess import transform_spec

    info, state_dict = load_archive(ctx.archive)
    model = archive_model(ctx, info, state_dict)
    preprocessing = {key: row["value"] for key, row in info["preprocessing"].items()
                     if key in ("resize_size", "crop_size", "interpolation", "mean", "std")}
    preprocessing = {key: tuple(value) if isinstance(value, list) else value for key, value in preprocessing.items()}
    config = HandlerConfig(architecture=info["architecture"], num_classes=info["num_classes"], device=ctx.device.type,
                           max_batch=ctx.max_batch, warmup=False, reduced_jpeg_decode=False, **preprocessing)
    decoder = DeviceJpegDecoder(transform_spec(config), ctx.device)  # on the CPU: the bound measurement
    on_device = InferenceEngine(config, model, ctx.device, device_decoder=decoder)
    on_cpu = InferenceEngine(dataclasses.replace(config, decode_device="cpu"), model, ctx.device)
    payloads = mixed_request(ctx) + ctx.corpus.sets["baseline 12 MP"]
    kinds = frozenset({TOPK, EMBEDDING})
    classes = info["num_classes"]
    with torch.inference_mode():
        ours = on_device.predict_outputs(payloads, classes, kinds)
        theirs = on_cpu.predict_outputs(payloads, classes, kinds)
    on_device.close()
    on_cpu.close()
    figures = compare_predictions(ours, theirs, classes)
    same_errors = [isinstance(r, ImageError) for r in ours] == [isinstance(r, ImageError) for r in theirs]
    figures.update(model=info["architecture"], weights=info.get("weights", {}).get("file"), images=len(payloads),
                   max_batch=ctx.max_batch, same_errors=same_errors,
                   decoder=f"{decoder.backend.name} on {ctx.device.type}",
                   bounds={"min_embedding_cosine": PARITY_MIN_COSINE,
                           "max_probability_shift": PARITY_MAX_PROBABILITY_SHIFT, "measured": PARITY_MEASURED})
    ok = (same_errors and figures["images_compared"] > 0
          and figures["min_embedding_cosine"] >= PARITY_MIN_COSINE
          and figures["max_probability_shift"] <= PARITY_MAX_PROBABILITY_SHIFT)
    return judged(ok, "the device-decode engine's outputs differ from the CPU-decode engine's beyond the bounds",
                  **figures)


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
    path = os.pathsep.join(map(str, IMPORT_PATH))
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
    from handler.backends import inductor_step
    from handler.engine import InferenceEngine

    torch.manual_seed(0)
    eager = build_architecture("resnet50", 1000).eval().to(ctx.device)
    config = ctx.config(max_batch=32, backend="inductor")
    model = inductor_step(eager, ctx.precision, Path(tempfile.mkdtemp(prefix="gpu-check-inductor-")))
    engine = InferenceEngine(config, eager, ctx.device, step=model)
    crop = engine.config.crop_size
    per_bucket = {}
    for size in engine.buckets:  # compile + first run, one static graph per bucket, timed one by one
        started = time.perf_counter()
        with torch.inference_mode():
            model(engine.normalize(torch.zeros((size, crop, crop, 3), dtype=torch.uint8, device=ctx.device)))
        torch.cuda.synchronize(ctx.device)
        per_bucket[size] = time.perf_counter() - started
        print(f"  compile bucket {size:>3}: {per_bucket[size]:.1f} s", flush=True)
    started = time.perf_counter()
    engine.warm_up()  # what a worker's start-up adds once the graphs exist (cudnn, the decoder's warm-up)
    warm_up_seconds = time.perf_counter() - started
    engine.close()
    total = sum(per_bucket.values()) + warm_up_seconds
    limit = startup_timeout()
    return judged(limit is not None and total < limit, "compile + warm-up exceed startupTimeout",
                  buckets=list(per_bucket), compile_seconds_per_bucket=per_bucket, warm_up_seconds=warm_up_seconds,
                  compile_and_warm_up_seconds=total, startup_timeout_seconds=limit,
                  note="one worker, compile cache empty; workers starting together on one GPU take longer")


def time_methods(ctx: Context, run: Run) -> Check:
    """ms per request and images/s for each way of serving one request of ``ctx.images`` images; each row goes
    into the report as soon as it is measured."""
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
    rows = run.report["timings"]
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
            run.save()
            print(f"  {set_name:<20} {name:<40} {row['p50_ms']:>9.1f} ms {row['images_per_s']:>8.1f} img/s")
    if not ctx.cuda:
        rows.append({"method": "(d) engine, device decode", "status": "skipped", "reason": "no CUDA"})
    for engine in engines.values():
        engine.close()
    return passed(rows=len(rows))


class Run:
    """The report, rewritten after every check, and the deadline that ends the run in time whatever is running."""

    def __init__(self, args: argparse.Namespace) -> None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench_results"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
        self.began = time.perf_counter()
        self.deadline = args.deadline
        self.report: dict[str, Any] = {"arguments": vars(args), "checks": {}, "timings": []}
        self.running: str | None = None
        self.planned: list[str] = []
        self._lock = threading.RLock()
        self._timer = threading.Timer(max(0.0, args.deadline), self._deadline_reached)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.began)

    def record(self, name: str, check: Check) -> None:
        with self._lock:
            self.report["checks"][name] = check
            self.save()
        print(f"{name:<16} {check['status']:<12} {check.get('reason', '')}", flush=True)

    def run(self, name: str, function: Callable[[], Check], needs_s: float = 5.0) -> None:
        if self.left() < needs_s:
            self.record(name, skipped(f"deadline: {self.left():.0f} s left, this check needs about {needs_s:.0f} s"))
            return
        self.running = name
        started = time.perf_counter()
        try:
            check = function()
        except Exception as error:  # a check that crashes is a failed check; the others still run
            check = failed(f"raised {error!r}")
        check["seconds"] = time.perf_counter() - started
        self.running = None
        self.record(name, check)

    def save(self) -> None:
        with self._lock:
            statuses = [check["status"] for check in self.report["checks"].values()]
            self.report["summary"] = {status: statuses.count(status)
                                      for status in ("passed", "failed", "inconclusive", "skipped")}
            self.report["elapsed_s"] = time.perf_counter() - self.began
            partial = self.path.with_suffix(".json.partial")
            partial.write_text(json.dumps(self.report, indent=2, default=str))
            partial.replace(self.path)

    def finish(self) -> int:
        self._timer.cancel()
        with self._lock:
            self.save()
            for line in summary_lines(self.report):
                print(line)
            print(f"report written to {self.path} ({self.report['elapsed_s']:.0f} s)", flush=True)
            return 1 if self.report["summary"]["failed"] else 0

    def _deadline_reached(self) -> None:
        with self._lock:
            self.report["cut_short"] = {"after_s": time.perf_counter() - self.began, "while_running": self.running}
            if self.running:
                self.report["checks"][self.running] = skipped(f"deadline: cut short after {self.deadline:.0f} s")
            for name in self.planned:
                self.report["checks"].setdefault(name, skipped("deadline: not reached"))
            print(f"\ndeadline of {self.deadline:.0f} s reached while running {self.running or 'nothing'}; "
                  f"ending here", flush=True)
            code = self.finish()
        os._exit(code)  # whatever the main thread is blocked in (a compile, a child process) ends with us


def figure(value: Any, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Every key figure on a few lines of stdout, for a lease whose files may not come back."""
    checks, lines = report["checks"], ["", "== summary =="]
    rows = [row for row in report.get("timings", []) if "p50_ms" in row]
    for set_name in ("baseline 500x375", "baseline 12 MP", "progressive 12 MP"):
        cells = [f"{row['method'].split(')')[0]}) {figure(row['images_per_s'])} img/s, p50 {figure(row['p50_ms'])} ms"
                 for row in rows if row["set"] == set_name]
        if cells:
            images = next(row["images"] for row in rows if row["set"] == set_name)
            lines.append(f"one {images}-photo request, {set_name}: " + "; ".join(cells))
    if not rows:
        lines.append("timings: none measured")
    parity = checks.get("parity", {})
    lines.append(f"parity ({parity.get('status', 'not run')}): min embedding cosine "
                 f"{figure(parity.get('min_embedding_cosine'), digits=5)}, max probability shift "
                 f"{figure(parity.get('max_probability_shift'), digits=4)}, same top-1 {parity.get('same_top1', 'n/a')}"
                 f" ({parity.get('decoder', parity.get('reason', ''))})")
    race = checks.get("stream_race", {})
    lines.append(f"stream race: {race.get('status', 'not run')}"
                 + (f" (control reproduced the race: {race['race_reproduced_by_control']})"
                    if "race_reproduced_by_control" in race else f" ({race.get('reason', '')})"))
    compiled = checks.get("compile", {})
    per_bucket = compiled.get("compile_seconds_per_bucket")
    lines.append("compile per bucket: " + (", ".join(f"{size}: {seconds:.1f} s" for size, seconds in per_bucket.items())
                                           if per_bucket else f"{compiled.get('status', 'not run')} "
                                                              f"({compiled.get('reason', '')})"))
    device = checks.get("device_parity", {})
    worst = [row.get("worst_mean_levels_vs_cpu_path") for row in device.values() if isinstance(row, dict)]
    worst = [value for value in worst if value is not None]
    lines.append(f"device crops vs CPU path: {device.get('status', 'not run')}, worst image mean "
                 f"{figure(max(worst) if worst else None, ' levels', 2)}")
    lines.append(f"checks: {report.get('summary')}" + (f"; cut short: {report['cut_short']}" if "cut_short" in report
                                                         else ""))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images per request, max_batch 3, 2 repeats, no compile")
    parser.add_argument("--images", type=int, help="images per request (default 32; 8 with --quick)")
    parser.add_argument("--max-batch", type=int, help="images per forward (default 8; 3 with --quick)")
    parser.add_argument("--repeats", type=int,
                        help="timed requests per method (default 5; with --quick 2, or 1 without CUDA)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds after which the run ends with what it has (default {DEFAULT_DEADLINE_S})")
    parser.add_argument("--archive", help=f"model archive for the parity check (default {DEFAULT_ARCHIVE})")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a lease's log shows each line as it is printed
    warnings.filterwarnings("ignore", message=".*TorchCodec.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")

    run = Run(args)
    run.planned = ["torchserve_free", "light_imports", "timings", "parity", "device_parity", "stream_race", "warm_up",
                   "out_of_memory", "sticky_error", "gpu_tests", "compile"]
    run.report["environment"] = environment()
    print(json.dumps(run.report["environment"], indent=2))
    print(f"report: {run.path}; deadline {args.deadline:.0f} s")
    run.save()
    run.run("torchserve_free", check_torchserve_free)
    run.run("light_imports", check_light_imports)
    ctx = Context(args)
    run.report["corpus"] = {"source": ctx.corpus.source, "seconds": ctx.corpus_seconds,
                            "sets": {name: len(payloads) for name, payloads in ctx.corpus.sets.items()}}
    print(f"\ntimings ({ctx.images} images per request, max_batch {ctx.max_batch}, {ctx.device.type}):")
    cuda_checks = (("device_parity", check_device_parity, 10), ("stream_race", check_stream_race, 10),
                   ("warm_up", check_warm_up, 10), ("out_of_memory", check_out_of_memory, 5),
                   ("sticky_error", check_sticky_error, 15), ("gpu_tests", check_gpu_tests, 60),
                   ("compile", check_compile, 120))
    if not ctx.cuda:  # said at once, so that a run cut short by its deadline still says why they did not run
        for name, check, _ in cuda_checks:
            run.record(name, check(ctx))
    run.run("timings", lambda: time_methods(ctx, run), needs_s=20)
    for name, check, needs_s in (("parity", check_parity, 20), *(cuda_checks if ctx.cuda else ())):
        run.run(name, lambda check=check: check(ctx), needs_s)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
