"""The reference pipelines the engine is checked against. Nothing here imports the code under test.

A model's own eval transform, one image at a time, in float32 on the CPU, from a full-resolution decode:
timm's ``create_transform`` of the model's data config, torchvision's weights transforms, or the same
Resize / CenterCrop / ToTensor / Normalize built from explicit numbers. Images are opened with PIL,
turned upright (EXIF) and converted to RGB here, independently of handler/imaging.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Transform = Callable[[Image.Image], torch.Tensor]


def open_rgb(payload: bytes) -> Image.Image:
    """Full decode, EXIF orientation applied, RGB. 16-bit grey keeps its high byte (PIL's convert would clip)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(payload)))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        high_byte = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.merge("RGB", [Image.fromarray(high_byte)] * 3)
    return image.convert("RGB")


def eval_transform(resize_size: int = 256, crop_size: int = 224, interpolation: str = "bilinear",
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Transform:
    """Resize(short side) -> CenterCrop -> ToTensor -> Normalize: timm's and torchvision's eval transform."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode(interpolation)),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def timm_transform(model: torch.nn.Module) -> Transform:
    """timm's own eval transform for a timm model (its pretrained data config)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model))


def torchvision_transform(architecture: str) -> Transform:
    """torchvision's eval transform for an architecture: the one its default weights were trained with."""
    import torchvision

    return torchvision.models.get_model_weights(architecture).DEFAULT.transforms()


def reference_tensor(payload: bytes, transform: Transform | None = None) -> torch.Tensor:
    """Normalized float (3, crop, crop) tensor; the ImageNet bilinear 256/224 transform by default."""
    return (transform or eval_transform())(open_rgb(payload))


def reference_probabilities(model: torch.nn.Module, payloads: Sequence[bytes], transform: Transform) -> torch.Tensor:
    """Softmax of the model on the reference inputs, one row per payload."""
    with torch.inference_mode():
        batch = torch.stack([reference_tensor(payload, transform) for payload in payloads])
        return torch.softmax(model(batch).float(), dim=1)
