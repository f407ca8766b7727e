"""Helpers shared by the benchmark scripts: corpus, clocks, statistics, machine facts, output files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
UNTRAINED_NOTE = ("the ResNet-50 weights are a seeded random initialisation (no download possible): "
                  "predictions are meaningless, agreement only checks that the inputs match the reference")


def load_set(name: str, count: int | None = None) -> list[bytes]:
    """Images of one corpus set (made on first use), repeated cyclically when ``count`` exceeds the set."""
    folder = write_corpus(CORPUS_DIR) / name
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


def seeded_resnet50(seed: int = 0) -> torch.nn.Module:
    """The demo weights: build_mar.py's seeded random initialisation (handler.model.random_state_dict)."""
    from handler.model import random_state_dict

    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(random_state_dict("resnet50", 1000, seed))
    return model.eval()


def model_alone_throughput(model: torch.nn.Module, batch: int, threads: int, device: torch.device,
                           repeats: int = 5, max_seconds: float = 60.0, channels_last: bool = True) -> dict[str, Any]:
    """Images/s of the bare forward pass on random normalized tensors: the ceiling for serving."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.to(device).eval()
        images = torch.randn(batch, 3, 224, 224, device=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
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


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned text table; ``columns`` are (key, header) pairs, floats get 3 significant places."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return "" if value is None else str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(text) for text in column) for column in zip(headers, *body, strict=True)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(headers, widths, strict=True)),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) for row in body]
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


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
