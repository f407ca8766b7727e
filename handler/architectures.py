"""Classification architectures by name, and the preprocessing each one was trained with.

Names: any torchvision classification model (``resnet50``, ``efficientnet_b3``, ...) or any timm model
as ``timm:NAME`` (``timm:tf_efficientnet_lite0``, ``timm:convnext_tiny``, ``timm:resnet50.a1_in1k``).
timm is imported only for timm names, so the engine runs where timm is not installed.

The preprocessing is resolved once, when the archive is built, with a visible precedence: values in
model-config.yaml's ``handler:`` section > the model's own config (timm's pretrained config, torchvision's
weights transforms) > defaults. The archive then records the result; the server never guesses.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision

from handler.config import INTERPOLATIONS, ConfigError

TIMM_PREFIX = "timm:"
TORCHSCRIPT = "torchscript"
PREPROCESSING_KEYS = ("crop_size", "resize_size", "interpolation", "mean", "std")
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "crop_size": 224, "resize_size": 256, "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}
DEFAULT_CROP_PCT = DEFAULT_PREPROCESSING["crop_size"] / DEFAULT_PREPROCESSING["resize_size"]


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """" (did you mean timm:convnext_tiny, ...?)" for the known names closest to a misspelt one; "" if none is close."""
    close = difflib.get_close_matches(name.split(".")[0], known, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(prefix + candidate for candidate in close)}?)" if close else ""


def build_architecture(name: str, num_classes: int) -> torch.nn.Module:
    """The architecture with a fresh initialisation (never a download)."""
    if is_timm(name):
        import timm

        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            raise ConfigError(f"unknown timm model {timm_name!r}{did_you_mean(timm_name, timm.list_models(), 'timm:')}"
                              f"; timm {timm.__version__} knows {len(timm.list_models())} architectures, listed at "
                              f"https://huggingface.co/docs/timm/models")
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    if name not in torchvision_names:
        raise ConfigError(
            f"unknown architecture {name!r}{did_you_mean(name, torchvision_names)}: use a torchvision "
            f"classification model name such as resnet50, or timm:NAME for any timm model (e.g. timm:convnext_tiny)"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@dataclass(frozen=True)
class NativePreprocessing:
    """The preprocessing a model was trained with, and where that fact came from."""

    values: dict[str, Any]
    crop_pct: float | None
    source: str


def native_preprocessing(name: str, model: torch.nn.Module) -> NativePreprocessing:
    """What the model's own config says: timm's pretrained config, torchvision's weights transforms."""
    if is_timm(name):
        return _timm_preprocessing(model)
    if name != TORCHSCRIPT:
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is not None:
            transform = weights.transforms()
            crop, resize = transform.crop_size[0], transform.resize_size[0]
            values = {"crop_size": crop, "resize_size": resize, "interpolation": transform.interpolation.value,
                      "mean": list(transform.mean), "std": list(transform.std)}
            return NativePreprocessing(values, crop / resize, f"torchvision weights {weights}")
    return NativePreprocessing({}, None, "none (TorchScript carries no preprocessing)")


def _timm_preprocessing(model: torch.nn.Module) -> NativePreprocessing:
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    if height != width:
        raise ConfigError(f"the model expects {height}x{width} inputs; only square crops are supported: set "
                          f"crop_size (and resize_size) in the handler: section of model-config.yaml")
    if config.get("crop_mode", "center") != "center":
        raise ConfigError(f"the model's crop_mode is {config['crop_mode']!r}; only 'center' is supported: set "
                          f"crop_size and resize_size in the handler: section of model-config.yaml")
    crop_pct = float(config["crop_pct"])
    values = {"crop_size": height, "resize_size": math.floor(height / crop_pct),  # timm's eval transform
              "interpolation": config["interpolation"], "mean": list(config["mean"]), "std": list(config["std"])}
    tag = getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or type(model).__name__
    return NativePreprocessing(values, crop_pct, f"timm pretrained config ({tag})")


@dataclass(frozen=True)
class ResolvedSetting:
    value: Any
    source: str


def resolve_preprocessing(user: Mapping[str, Any], native: NativePreprocessing) -> dict[str, ResolvedSetting]:
    """Precedence: the user's handler: values > the model's config > defaults, each with its source.

    ``crop_pct`` (timm's name: crop = resize x crop_pct) may replace ``resize_size`` in the user's values;
    when the user changes only ``crop_size``, the resize follows the model's crop_pct.
    """
    if "crop_pct" in user and "resize_size" in user:
        raise ConfigError("set resize_size or crop_pct in the handler: section, not both")
    resolved: dict[str, ResolvedSetting] = {}
    for key in PREPROCESSING_KEYS:
        if key in user:
            resolved[key] = ResolvedSetting(user[key], "model-config.yaml")
        elif key in native.values:
            resolved[key] = ResolvedSetting(native.values[key], native.source)
        else:
            resolved[key] = ResolvedSetting(DEFAULT_PREPROCESSING[key], "default")

    crop_size = resolved["crop_size"].value
    if "crop_pct" in user:
        crop_pct = user["crop_pct"]
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ConfigError(f"crop_pct must be a number in (0, 1], e.g. 0.875; got {crop_pct!r}")
        resolved["resize_size"] = ResolvedSetting(math.floor(crop_size / crop_pct + 1e-9),
                                                  f"model-config.yaml crop_pct {crop_pct}")
    elif "crop_size" in user and "resize_size" not in user:
        crop_pct = native.crop_pct or DEFAULT_CROP_PCT
        resolved["resize_size"] = ResolvedSetting(math.floor(crop_size / crop_pct + 1e-9),
                                                  f"crop_size / crop_pct {crop_pct:g} ({native.source})")
    if resolved["interpolation"].value not in INTERPOLATIONS:
        raise ConfigError(f"the model asks for {resolved['interpolation'].value!r} interpolation; supported: "
                          f"{', '.join(INTERPOLATIONS)}: set interpolation in the handler: section")
    return resolved
