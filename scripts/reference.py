"""The reference pipeline the engine is checked against: what TorchServe's stock handler does.

Full PIL decode -> RGB -> torchvision Resize(256) / CenterCrop(224) / ToTensor / Normalize, in float32
on the CPU, one image at a time.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageOps
from torchvision import transforms

from handler.imaging import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(resize_size),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def reference_tensor(payload: bytes, resize_size: int = 256, crop_size: int = 224) -> torch.Tensor:
    """Normalized float (3, crop, crop) tensor from a full-resolution decode."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(payload)))
    return reference_transform(resize_size, crop_size)(to_rgb(image))
