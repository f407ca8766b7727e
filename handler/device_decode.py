"""Batched JPEG decode, resize and center crop on the model's device, with per-image routing.

Only JPEGs that are safe to decode there go to the device: ``decode`` answers ``None`` for every other
payload, meaning "send this one to the CPU path" (``handler.imaging``), which then produces the right
crop or the right ``ImageError``. Routing to the CPU is never wrong, only slower, so every doubt routes.

The eligible JPEGs are decoded in one batched call (nvJPEG on CUDA). A single bad image fails that
whole call, so on failure each image is retried alone and only the failing ones are routed.

Geometry is torchvision's ``Resize(resize_size)`` (bilinear or bicubic, antialias) + ``CenterCrop(crop_size)``,
as in ``handler.imaging``. On the CPU torchvision resizes uint8 natively; on CUDA it resizes in
float32 and rounds back to uint8, so the two devices may differ by a level here and there.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from handler.codecs import ImageError
from handler.imaging import EXIF_ORIENTATION_TAG, TransformSpec, resized_size

logger = logging.getLogger(__name__)

DecodeBatch = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
DEVICE_MODES = frozenset({"L", "RGB"})  # CMYK/YCCK and anything exotic stay on the CPU
ORIENTATIONS = frozenset(range(1, 9))


def torchvision_decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One torchvision call for the whole list; grayscale comes out with 3 channels too."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class JpegHeader:
    width: int  # as stored, before the EXIF orientation is applied
    height: int
    orientation: int  # EXIF orientation 1..8 (1 when absent)


def read_header(payload: bytes | bytearray | ImageError, spec: TransformSpec) -> JpegHeader | None:
    """The header of a JPEG the device may decode, or None to route the payload to the CPU path."""
    if isinstance(payload, ImageError) or not isinstance(payload, (bytes, bytearray)):
        return None
    if "JPEG" not in spec.allowed_formats or not payload.startswith(JPEG_SOI):
        return None
    if not payload[-64:].rstrip(b"\x00").endswith(JPEG_EOI):
        return None  # truncated: how nvJPEG treats a missing tail is unspecified; PIL gives a clear 400
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=("JPEG",))  # reads the header only
        width, height = image.size
        mode = image.mode
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # any header PIL cannot read: the CPU path explains it
        logger.debug("JPEG header unreadable; routing to the CPU path", exc_info=True)
        return None
    if mode not in DEVICE_MODES or orientation not in ORIENTATIONS:
        return None
    if width < 1 or height < 1 or width * height > spec.max_image_pixels:
        return None  # the CPU path answers 400 or 413 with the numbers
    return JpegHeader(width, height, orientation)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a (..., H, W) image upright, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.rot90(2, (-2, -1))
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).rot90(2, (-2, -1))
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def resize_and_crop(image: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """(3, H, W) uint8 -> (crop, crop, 3) uint8, contiguous, on the same device."""
    height, width = image.shape[-2:]
    new_width, new_height = resized_size(width, height, spec.resize_size)
    interpolation = InterpolationMode(spec.interpolation)
    resized = F.resize(image, [new_height, new_width], interpolation=interpolation, antialias=True)
    cropped = F.center_crop(resized, [spec.crop_size, spec.crop_size])
    return cropped.permute(1, 2, 0).contiguous()


class DeviceJpegDecoder:
    """Payloads -> crops on ``device``, or None for each payload the CPU path must handle."""

    def __init__(self, spec: TransformSpec, device: torch.device, decode_batch: DecodeBatch | None = None) -> None:
        self.spec = spec
        self.device = device
        self._decode_batch = decode_batch or torchvision_decode_batch

    def decode(self, payloads: Sequence[bytes | ImageError]) -> list[torch.Tensor | None]:
        """For each payload, a (crop, crop, 3) uint8 tensor on the device, or None (route to the CPU)."""
        results: list[torch.Tensor | None] = [None] * len(payloads)
        headers = [read_header(payload, self.spec) for payload in payloads]
        eligible = [i for i, header in enumerate(headers) if header is not None]
        if not eligible:
            return results
        # A copy: the decoder never sees (or could write to) the caller's bytes.
        data = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in eligible]  # type: ignore[arg-type]
        for index, decoded in zip(eligible, self._decode_all(data), strict=True):
            if decoded is not None:
                results[index] = self._finish(decoded, headers[index])  # type: ignore[arg-type]
        return results

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        decoded = self._call(data)
        if decoded is not None:
            return decoded
        logger.debug("batched JPEG decode of %d images failed; retrying one by one", len(data))
        return [(self._call([item]) or [None])[0] for item in data]

    def _call(self, data: list[torch.Tensor]) -> list[torch.Tensor] | None:
        try:
            decoded = list(self._decode_batch(data, self.device))
        except Exception:  # nvJPEG/libjpeg errors, CUDA OOM, ...: the caller retries or routes
            logger.debug("JPEG decode of %d images failed", len(data), exc_info=True)
            return None
        return decoded if len(decoded) == len(data) else None

    def _finish(self, decoded: torch.Tensor, header: JpegHeader) -> torch.Tensor | None:
        if decoded.dtype != torch.uint8 or tuple(decoded.shape) != (3, header.height, header.width):
            logger.debug("decoded shape %s does not match the header; routing", tuple(decoded.shape))
            return None
        try:
            return resize_and_crop(apply_orientation(decoded, header.orientation), self.spec)
        except Exception:  # e.g. out of device memory for one huge image
            logger.debug("device resize failed; routing to the CPU path", exc_info=True)
            return None
