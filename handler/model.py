"""Load the classification model for serving: an architecture + its state_dict, or TorchScript."""

from __future__ import annotations

import json
import logging
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from handler.architectures import TORCHSCRIPT, build_architecture
from handler.config import ConfigError, HandlerConfig
from handler.outputs import split_classifier

logger = logging.getLogger(__name__)

BUILD_INFO_FILE = "build_info.json"  # written by scripts/build_mar.py: what the archive holds, and from where
LABELS_FILE = "index_to_name.json"
GATE_IMAGES_DIR = "gate_images"  # real photos in the archive: reduced precision and backends are checked on them
UNTRAINED_WARNING = (
    "THE MODEL WEIGHTS ARE UNTRAINED (random initialisation, seed {seed}): predictions are meaningless. "
    "Serve your own weights: scripts/serve.sh --arch NAME --weights FILE"
)


def resolve_device(requested: str, gpu_id: int | None = None) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ConfigError("device is 'cuda' but CUDA is not available here; use device: auto or cpu")
        return torch.device("cpu")
    return torch.device("cuda", gpu_id or 0)


def load_model(config: HandlerConfig, weights_path: Path, device: torch.device) -> torch.nn.Module:
    """Load weights (state_dict, or TorchScript when architecture is 'torchscript') in eval mode, fp32 (the
    model step, handler.backends, makes its own reduced-precision copy).

    A model with a final Linear head comes split (handler.outputs.SplitClassifier): one forward gives its
    pooled features (the embedding) and its logits.
    """
    if config.architecture == TORCHSCRIPT:
        model = torch.jit.load(str(weights_path), map_location="cpu")
    else:
        model = build_architecture(config.architecture, config.num_classes)
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file raises zip, pickle or runtime errors
            raise ConfigError(f"the archive's weights file {weights_path.name} cannot be read ({error}); "
                              f"rebuild the archive") from None
        if not isinstance(state_dict, dict):
            raise ConfigError(f"{weights_path.name} must hold a state_dict (torch.save(model.state_dict(), ...))")
        check_weights_fit(model, state_dict, config.architecture)
        model.load_state_dict(state_dict)
        model = split_classifier(model, config.num_classes) or model
    return model.to(device=device, dtype=torch.float32).eval()


class WeightsMismatch(ConfigError):
    """A state_dict that does not fit the architecture it is meant for."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a torch.save file (.pt/.pth, also a checkpoint holding "state_dict" or "model")
    or a .safetensors file; a DataParallel "module." prefix is removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict: Any = load_file(str(path))
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle/zip errors come in many types
            pickled = pickled_object(path)
            if pickled is not None:
                raise WeightsMismatch(
                    f"{path} holds a whole pickled object ({pickled}), not a state_dict: save the weights alone with "
                    f"torch.save(model.state_dict(), {path.name!r}) and pass that file (a TorchScript file: "
                    f"--arch torchscript)") from None
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise WeightsMismatch(f"{path} is not a state_dict saved with torch.save ({type(error).__name__}: "
                                  f"{first_line})") from None
    for key in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsMismatch(f"{path} does not hold a state_dict: save it with torch.save(model.state_dict(), "
                              f"path) (for TorchScript use --arch torchscript)")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


# What torch.save pickles for a state_dict: tensors, storages, dicts. Any other class is a pickled Python object.
STATE_DICT_PICKLE_MODULES = frozenset({"torch", "torch._utils", "torch.serialization", "collections", "builtins",
                                       "_codecs", "torch._tensor"})


def pickled_object(path: Path) -> str | None:
    """The first class a torch.save file pickles besides tensors and dicts (e.g. torchvision.models.resnet.ResNet
    for torch.save(model)), read from the pickle's opcodes without loading anything; None if there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
            if pickle_name is None:
                return None
            data = archive.read(pickle_name)
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                if module not in STATE_DICT_PICKLE_MODULES:
                    return f"{module}.{name}"
    except (OSError, ValueError, zipfile.BadZipFile):  # not a zip, or a pickle cut short: not a whole model
        return None
    return None


def check_weights_fit(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], architecture: str) -> None:
    """Raise WeightsMismatch naming the first key that does not fit, with both shapes.

    BatchNorm's num_batches_tracked counters may be absent (many exported weights drop them).
    """
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise WeightsMismatch(
                f"the weights do not fit {architecture}: {key} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(expected[key].shape)} in {architecture} (wrong --arch, or set num_classes?)"
            )
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    if missing:
        raise WeightsMismatch(f"the weights do not fit {architecture}: {len(missing)} of its tensors are missing "
                              f"from the file, the first is {missing[0]} (wrong --arch?)")
    if unexpected:
        raise WeightsMismatch(f"the weights do not fit {architecture}: the file has {len(unexpected)} tensors "
                              f"{architecture} does not have, the first is {unexpected[0]} (wrong --arch?)")
    for key in expected:
        if key not in state_dict:
            state_dict[key] = expected[key]  # the absent num_batches_tracked counters


def read_gate_images(folder: Path) -> list[bytes]:
    """The archive's real photos for the accuracy gate (scripts/build_mar.py packs them); none if absent."""
    return [path.read_bytes() for path in sorted(folder.glob("*.jpg"))] if folder.is_dir() else []


def read_build_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / BUILD_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def warn_if_untrained(build_info: dict[str, Any]) -> bool:
    """Log loudly when the archive says its weights are a random initialisation."""
    weights = build_info.get("weights", {})
    if weights.get("source") != "random":
        return False
    banner = "!" * 100
    logger.warning("%s\n%s\n%s", banner, UNTRAINED_WARNING.format(seed=weights.get("seed")), banner)
    return True


def load_labels(path: Path, num_classes: int) -> list[str]:
    """Class names from TorchServe's index_to_name.json; the index itself where a name is missing."""
    names = json.loads(path.read_text()) if path.exists() else {}
    labels = []
    for index in range(num_classes):
        name = names.get(str(index), str(index))
        labels.append(name[-1] if isinstance(name, list) else str(name))
    return labels
