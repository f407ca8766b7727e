"""Helpers shared by the benchmark scripts: corpus, the demo's preprocessing, clocks, statistics, progress,
machine facts, tables, plots and output files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torchvision  # noqa: E402
from make_corpus import write_corpus  # noqa: E402

CORPUS_DIR = REPO / ".cache" / "corpus"
DEFAULT_OUT = REPO / "bench_results"
SETS = ("imagenet", "phone", "mixed")
SET_TITLES = {"imagenet": "ImageNet-size JPEG (~500x375)", "phone": "12 MP phone JPEG (4032x3024)",
              "mixed": "mixed formats (PNG, grey, RGBA, ...)"}
SMOKE_NOTICE = ("SMOKE RUN (--quick): this only checks that the script works. Its numbers are not measurements "
                "and recommend nothing; run without --quick to measure.")
PREPROCESSING_KEYS = ("resize_size", "crop_size", "interpolation", "mean", "std")
_corpus_ready = False


@contextmanager
def step(what: str, expected_s: float, delay: float = 0.0) -> Iterator[None]:
    """Say what is being done, with a bar that moves with the elapsed time against ``expected_s``.

    For work that reports no progress of its own (building archives, starting TorchServe, making photos).
    The bar stops just short of the end if the work takes longer than expected; the elapsed time keeps
    counting. With ``delay`` it appears only if the work takes longer than that.
    """
    ticks = max(1, round(4 * expected_s))
    from tqdm import tqdm  # here, not at import: bench/gpu_check.py times with this module on bare GPU boxes

    bar = tqdm(total=ticks, desc=f"{what} (~{expected_s:.0f} s)", bar_format="{desc} |{bar}| {elapsed}",
               delay=delay, dynamic_ncols=True)
    finished = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not finished.wait(0.25):
            elapsed = time.monotonic() - started
            bar.n = min(ticks - 1, int(4 * elapsed))
            if elapsed >= delay:
                bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
        bar.n = ticks
    finally:
        finished.set()
        ticker.join()
        bar.close()


def ensure_corpus() -> Path:
    """The benchmark photos, made from scikit-image's bundled photos on the first run (about a minute)."""
    global _corpus_ready
    if not _corpus_ready:
        with step("making the test photos (first run only)", expected_s=45, delay=1.0):
            write_corpus(CORPUS_DIR)
        _corpus_ready = True
    return CORPUS_DIR


def load_set(name: str, count: int | None = None) -> list[bytes]:
    """Images of one corpus set (made on first use), repeated cyclically when ``count`` exceeds the set."""
    folder = ensure_corpus() / name
    images = [path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()]
    if count is None:
        return images
    return [images[i % len(images)] for i in range(count)]


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, device work included."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def repeat_timed(function: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                 max_seconds: float, min_repeats: int = 2) -> list[float]:
    """Warm up, then time up to ``repeats`` calls, stopping early (after ``min_repeats``) past ``max_seconds``."""
    for _ in range(warmup):
        function()
    samples: list[float] = []
    deadline = time.monotonic() + max_seconds
    while len(samples) < repeats and (len(samples) < min_repeats or time.monotonic() < deadline):
        samples.append(time_call(function, device))
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median and spread (quartiles, min, max, relative IQR) of timing samples in seconds."""
    median = statistics.median(samples)
    p25, p75 = percentile(samples, 25), percentile(samples, 75)
    return {
        "n": len(samples), "median_s": median, "p25_s": p25, "p75_s": p75,
        "min_s": min(samples), "max_s": max(samples),
        "spread_pct": 100.0 * (p75 - p25) / median if median else 0.0,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """Date, hardware and software versions, and the exact command, for the record."""
    memory_gib = None
    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def demo_handler_settings(config: Path = REPO / "model-config.yaml") -> tuple[dict[str, Any], dict[str, str]]:
    """The demo archive's handler: section exactly as scripts/build_mar.py resolves and records it
    (model-config.yaml's handler: values > the model's own timm config > defaults), and where each
    preprocessing value came from. Only the architecture is built: no weights are read."""
    from build_mar import DEFAULT_NUM_CLASSES, DEMO_ARCH, load_user_config, resolve_handler_section

    from handler.architectures import build_architecture

    user = dict(load_user_config(config).get("handler") or {})
    model = build_architecture(DEMO_ARCH, DEFAULT_NUM_CLASSES)
    section, rows = resolve_handler_section(user, DEMO_ARCH, (DEFAULT_NUM_CLASSES, "default"), model)
    sources = {key: source for key, _, source in rows if key in PREPROCESSING_KEYS}
    return section, sources


def model_alone_throughput(model: Callable[[torch.Tensor], Any], batch: int, threads: int, device: torch.device,
                           repeats: int = 5, max_seconds: float = 60.0, channels_last: bool = True,
                           image_size: int = 224) -> dict[str, Any]:
    """Images/s of the bare forward pass on random normalized tensors: the ceiling for serving. ``model``: a
    module, or a model step (handler.backends) as the server runs it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        if isinstance(model, torch.nn.Module):
            model = model.to(device).eval()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            with torch.inference_mode():
                model(images)

        samples = repeat_timed(forward, device, warmup=1, repeats=repeats, max_seconds=max_seconds)
    finally:
        torch.set_num_threads(previous)
    stats = summarize(samples)
    return {"batch": batch, "threads": threads, "channels_last": channels_last, **stats,
            "images_per_s": batch / stats["median_s"]}


@dataclass
class ServedArchive:
    """What the server reads from a .mar: settings, the model (on the CPU), its gate photos, its cache key."""

    model_yaml: dict[str, Any]
    model: torch.nn.Module
    config: Any  # handler.config.HandlerConfig (imported lazily: gpu_check imports this module on a bare box)
    gate_images: list[bytes]
    model_key: str


def unpack_archive(mar: Path) -> ServedArchive:
    import yaml

    from handler.backends import weights_key
    from handler.config import HandlerConfig
    from handler.model import GATE_IMAGES_DIR, load_model, read_gate_images

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp)
        folder = Path(tmp)
        model_yaml = yaml.safe_load((folder / "model-config.yaml").read_text()) or {}
        config = HandlerConfig.from_model_yaml(model_yaml)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
        weights = folder / manifest["model"]["serializedFile"]
        model = load_model(config, weights, torch.device("cpu"))
        return ServedArchive(model_yaml, model, config, read_gate_images(folder / GATE_IMAGES_DIR),
                             weights_key(weights, config))


def served_engine(archive: ServedArchive, config: Any = None) -> tuple[Any, Any]:
    """An engine on the CPU serving the model step the server would choose (warmed up when it compiles), and the
    choice (handler.backends.StepChoice)."""
    from handler.backends import choose_model_step, eager_step
    from handler.engine import InferenceEngine

    config = config or archive.config
    cpu = torch.device("cpu")
    engine = InferenceEngine(config, archive.model, cpu, step=eager_step(archive.model, "fp32"))
    step, choice = choose_model_step(config, archive.model, cpu, engine.normalized(archive.gate_images),
                                     archive.model_key)
    engine.use_step(step)
    if step.static_shapes:
        engine.warm_up()  # compiles every bucket
    return engine, choice


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, ...]]) -> str:
    """A plain aligned text table; floats get 3 significant places.

    ``columns`` are (key, header) or (key, header, meaning); the meanings are listed under the table.
    """
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return "" if value is None else str(value)

    body = [[cell(row.get(column[0])) for column in columns] for row in rows]
    headers = [column[1] for column in columns]
    widths = [max(len(text) for text in column) for column in zip(headers, *body, strict=True)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(headers, widths, strict=True)),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) for row in body]
    lines += [f"  {column[1]}: {column[2]}" for column in columns if len(column) > 2]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def new_figure(columns: int, rows: int = 1, width: float = 6.0, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)


def label_bars(axis, bars, values: Sequence[float]) -> None:
    """Write each bar's value on top of it (3 significant digits)."""
    axis.bar_label(bars, labels=[format_value(v) for v in values], fontsize=7, padding=2)


def format_value(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def drawn_labels(figure) -> list[str]:
    """Every text written inside the plot areas (bar values, line labels): what a reader sees on the bars."""
    return [text.get_text() for axis in figure.axes for text in axis.texts]


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
