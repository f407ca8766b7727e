"""One validated settings object for the whole handler.

Built once from the ``handler:`` section of model-config.yaml (TorchServe hands it to the
handler as ``context.model_yaml_config``). Precedence: values given there > defaults here.
Every invalid value is rejected at start-up with a message that says what to write instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DECODE_STRATEGIES = ("threads", "dataloader", "inline")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("auto", "eager", "inductor", "openvino")
INTERPOLATIONS = ("bilinear", "bicubic")
START_METHODS = ("forkserver", "spawn", "fork")
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max"), affinity: int | None = None) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 quota (a container's CPU limit)."""
    cores = affinity or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity is the limit
    return max(1, cores)


class ConfigError(ValueError):
    """A setting in the handler configuration is invalid."""


@dataclass(frozen=True)
class HandlerConfig:
    # Geometry and normalization (ImageNet defaults: resize 256, center-crop 224). build_mar.py writes the
    # model's own values here (timm's pretrained config, torchvision's weights transforms).
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Decode at a reduced JPEG DCT scale when the image is much larger than resize_size.
    reduced_jpeg_decode: bool = True
    # Decode at least this multiple of resize_size on the short side; chosen by bench/bench_decode_scale.py.
    draft_margin: float = 2.0

    # How images are decoded and transformed.
    decode_strategy: str = "threads"
    decode_threads: int = 0  # 0: derived from the cores and max_workers
    dataloader_workers: int = 2
    dataloader_batch_size: int = 32
    # forkserver: forking this process (decode threads, torch threads, maybe CUDA) can deadlock a worker.
    dataloader_start_method: str = "forkserver"
    pin_memory: bool = True

    # Model execution.
    max_batch: int = 32
    device: str = "auto"
    decode_device: str = "auto"  # auto: JPEGs decoded on the model's GPU when it has one
    # auto: bf16 on a CPU with native bf16 (AMX/AVX512-BF16), fp16 on CUDA, fp32 otherwise; a reduced
    # precision serves only if it passes the accuracy gate against fp32 (handler.backends).
    precision: str = "auto"
    channels_last: bool = True
    batch_buckets: tuple[int, ...] = ()  # empty: no padding (CPU, eager/openvino); see resolve_buckets()
    # The model step: auto picks the fastest that is installed and works on the device (handler.backends).
    backend: str = "auto"
    # Compile/convert caches that survive a worker restart; empty: $XDG_CACHE_HOME (or ~/.cache)/image-batch-handler
    cache_dir: str = ""
    torch_threads: int = 0  # 0: derived from the cores and max_workers
    warmup: bool = True
    # With batch buckets (CUDA): a request is cut into about this many chunks, so that the model runs on the first
    # while the rest is decoded (handler.engine.plan_chunks); 1: one chunk per max_batch images.
    chunks_per_request: int = 2

    # Model definition and outputs.
    architecture: str = "resnet50"
    num_classes: int = 1000
    topk: int = 5
    embedding_normalize: bool = True  # embeddings come L2-normalised (cosine similarity = dot product)

    # Limits against hostile or oversized input.
    max_images_per_request: int = 64
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS

    # TorchServe's maxWorkers for this model: the pool and torch threads share the cores among them.
    max_workers: int = 1
    cpu_count: int = field(default_factory=lambda: available_cpus())

    def __post_init__(self) -> None:
        _require(self.crop_size >= 1, "crop_size must be a positive number of pixels")
        _require(
            self.resize_size >= self.crop_size,
            f"resize_size ({self.resize_size}) must be at least crop_size ({self.crop_size})",
        )
        _require(
            self.interpolation in INTERPOLATIONS,
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}",
        )
        _require(len(self.mean) == 3 and len(self.std) == 3, "mean and std must each have 3 values (R, G, B)")
        _require(all(s > 0 for s in self.std), "every std value must be greater than 0")
        _require(self.draft_margin >= 1.0, "draft_margin must be at least 1.0 (1.0 = smallest JPEG decode)")
        _require(
            self.decode_strategy in DECODE_STRATEGIES,
            f"decode_strategy must be one of {', '.join(DECODE_STRATEGIES)}; got {self.decode_strategy!r}",
        )
        _require(self.decode_threads >= 0, "decode_threads must be 0 (automatic) or a positive number")
        _require(self.dataloader_workers >= 0, "dataloader_workers must be 0 or more")
        _require(self.dataloader_batch_size >= 1, "dataloader_batch_size must be greater than 0")
        _require(
            self.dataloader_start_method in START_METHODS,
            f"dataloader_start_method must be one of {', '.join(START_METHODS)}; got {self.dataloader_start_method!r}",
        )
        _require(self.max_batch >= 1, "max_batch must be greater than 0")
        _require(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        _require(
            self.decode_device in DEVICES,
            f"decode_device must be one of {', '.join(DEVICES)}; got {self.decode_device!r}",
        )
        _require(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
        )
        _require(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        _require(all(b >= 1 for b in self.batch_buckets), "every batch bucket must be greater than 0")
        _require(
            list(self.batch_buckets) == sorted(set(self.batch_buckets)),
            "batch_buckets must be strictly increasing, e.g. [1, 8, 32]",
        )
        _require(
            not self.batch_buckets or self.batch_buckets[-1] >= self.max_batch,
            f"the largest batch bucket must be at least max_batch ({self.max_batch})",
        )
        _require(self.torch_threads >= 0, "torch_threads must be 0 (automatic) or a positive number")
        _require(self.chunks_per_request >= 1, "chunks_per_request must be 1 (no split) or more, e.g. 2")
        _require(1 <= self.topk <= self.num_classes, f"topk must be between 1 and num_classes ({self.num_classes})")
        _require(self.max_images_per_request >= 1, "max_images_per_request must be greater than 0")
        _require(self.max_image_bytes >= 1, "max_image_bytes must be greater than 0")
        _require(self.max_image_pixels >= 1, "max_image_pixels must be greater than 0")
        _require(len(self.allowed_formats) >= 1, "allowed_formats must name at least one format, e.g. [JPEG, PNG]")
        _require(self.max_workers >= 1, "max_workers must be greater than 0")

    @property
    def pool_size(self) -> int:
        """Decode threads: the cores divided among the workers, unless set explicitly."""
        if self.decode_threads:
            return self.decode_threads
        return max(1, self.cpu_count // self.max_workers)

    @property
    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "image-batch-handler"

    @property
    def intra_op_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, self.cpu_count // self.max_workers)

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any] | None) -> HandlerConfig:
        """Build from a whole model-config.yaml: its ``handler:`` section plus ``maxWorkers``."""
        model_yaml = model_yaml or {}
        section = model_yaml.get("handler") or {}
        if not isinstance(section, Mapping):
            raise ConfigError("the 'handler' section of model-config.yaml must be a mapping of settings")
        values = dict(section)
        if "max_workers" not in values and "maxWorkers" in model_yaml:
            values["max_workers"] = model_yaml["maxWorkers"]
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HandlerConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if "compile" in values:
            raise ConfigError("the handler setting 'compile' was replaced by 'backend': write backend: inductor "
                              "for torch.compile (or auto: the fastest backend installed here), eager for none")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown handler setting(s): {', '.join(unknown)}; known settings: {', '.join(sorted(fields))}"
            )
        converted = {name: _convert(name, value, fields[name].default) for name, value in values.items()}
        return cls(**converted)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _convert(name: str, value: Any, default: Any) -> Any:
    """Coerce a YAML value to the type of the field's default, refusing lossy conversions."""
    if default is dataclasses.MISSING:  # cpu_count, which has a factory
        default = 0
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false; got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number; got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number; got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string; got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        if name in ("mean", "std"):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{name} must be a list of numbers; got {value!r}")
            return tuple(float(v) for v in value)
        if name == "allowed_formats":
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of format names such as JPEG; got {value!r}")
            return tuple(v.upper() for v in value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{name} must be a list of whole numbers; got {value!r}")
        return tuple(value)
    raise ConfigError(f"{name} cannot be set")  # pragma: no cover - every field has a typed default
