"""A small JPEG corpus for bench/gpu_check.py and tests/test_gpu.py that needs nothing but numpy and Pillow.

Real photos from the repo's corpus (``.cache/corpus``, made by scripts/make_corpus.py from scikit-image's
bundled photos) when it is there; photo-like images drawn with numpy and Pillow otherwise. Every set comes
baseline and progressive, ImageNet-size (500x375) and 12 MP (4032x3024).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS_DIR = Path(__file__).resolve().parent.parent / ".cache" / "corpus"
SMALL, LARGE = (500, 375), (4032, 3024)


@dataclass(frozen=True)
class GpuCorpus:
    source: str  # where the pixels come from
    sets: dict[str, list[bytes]]  # "baseline 500x375", "progressive 500x375", "baseline 12 MP", "progressive 12 MP"


def load_corpus(small: int, large: int, corpus_dir: Path = CORPUS_DIR) -> GpuCorpus:
    small_photos = _repo_photos(corpus_dir / "imagenet", small)
    large_photos = _repo_photos(corpus_dir / "phone", large)
    if small_photos and large_photos:
        source = f"real photos from {corpus_dir}"
    else:
        source = "drawn with numpy and Pillow (no .cache/corpus here)"
        small_photos = [encode(photo_like(SMALL, seed)) for seed in range(small)]
        large_photos = [encode(photo_like(LARGE, 1000 + seed), quality=92) for seed in range(large)]
    return GpuCorpus(source, {
        "baseline 500x375": small_photos,
        "progressive 500x375": [progressive(payload) for payload in small_photos],
        "baseline 12 MP": large_photos,
        "progressive 12 MP": [progressive(payload) for payload in large_photos],
    })


def _repo_photos(folder: Path, count: int) -> list[bytes]:
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    return [paths[i % len(paths)].read_bytes() for i in range(count)] if paths else []


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour fields, a few hard-edged shapes and sensor-like grain: a JPEG of it decodes like a photo
    (every DCT band used), unlike a flat test card."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16).copy()
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1, y1 = x0 + int(rng.integers(width // 10, width // 4)), y0 + int(rng.integers(height // 10, height // 4))
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, quality: int = 90, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def progressive(payload: bytes) -> bytes:
    return encode(Image.open(io.BytesIO(payload)), quality=90, progressive=True)
