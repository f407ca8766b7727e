"""Build and load the classification model: torchvision architecture + plain state_dict, or TorchScript."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torchvision

from handler.config import ConfigError, HandlerConfig

logger = logging.getLogger(__name__)

WEIGHTS_INFO_FILE = "weights_info.json"
LABELS_FILE = "index_to_name.json"
UNTRAINED_WARNING = (
    "THE MODEL WEIGHTS ARE UNTRAINED (random initialisation, seed {seed}): predictions are meaningless. "
    "Rebuild the archive with your own weights: scripts/build_mar.py --weights FILE"
)


def resolve_device(requested: str, gpu_id: int | None = None) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ConfigError("device is 'cuda' but CUDA is not available here; use device: auto or cpu")
        return torch.device("cpu")
    return torch.device("cuda", gpu_id or 0)


def model_dtype(config: HandlerConfig, device: torch.device) -> torch.dtype:
    if config.precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]


def build_architecture(name: str, num_classes: int) -> torch.nn.Module:
    """A torchvision classification architecture with no weights downloaded."""
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        raise ConfigError(
            f"unknown architecture {name!r}; use a torchvision classification model name such as resnet50"
        ) from None


def random_state_dict(name: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random initialisation: the same seed gives the same weights everywhere."""
    torch.manual_seed(seed)
    return build_architecture(name, num_classes).state_dict()


def load_model(config: HandlerConfig, weights_path: Path, device: torch.device) -> torch.nn.Module:
    """Load weights (state_dict, or TorchScript when architecture is 'torchscript') in eval mode."""
    if config.architecture == "torchscript":
        model = torch.jit.load(str(weights_path), map_location="cpu")
    else:
        model = build_architecture(config.architecture, config.num_classes)
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ConfigError(f"{weights_path.name} must hold a state_dict (torch.save(model.state_dict(), ...))")
        model.load_state_dict(state_dict)
    model = model.to(device=device, dtype=model_dtype(config, device)).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_or_eager(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile when asked and available; the eager model otherwise (never fails start-up).

    Static shapes: one graph per batch bucket, each compiled at warm-up. By default the second batch size
    would recompile the model for dynamic shapes, slower to build and to run.
    """
    if not enabled:
        return model
    try:
        return torch.compile(model, dynamic=False)
    except Exception:  # compile support varies by platform and version: eager still serves
        logger.warning("torch.compile is unavailable; serving the eager model", exc_info=True)
        return model


def eager_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def warn_if_untrained(model_dir: Path) -> bool:
    """Log loudly when the archive says its weights are a random initialisation."""
    info_path = model_dir / WEIGHTS_INFO_FILE
    if not info_path.exists():
        return False
    info = json.loads(info_path.read_text())
    if info.get("source") != "random":
        return False
    banner = "!" * 100
    logger.warning("%s\n%s\n%s", banner, UNTRAINED_WARNING.format(seed=info.get("seed")), banner)
    return True


def load_labels(path: Path, num_classes: int) -> list[str]:
    """Class names from TorchServe's index_to_name.json; the index itself where a name is missing."""
    names = json.loads(path.read_text()) if path.exists() else {}
    labels = []
    for index in range(num_classes):
        name = names.get(str(index), str(index))
        labels.append(name[-1] if isinstance(name, list) else str(name))
    return labels
