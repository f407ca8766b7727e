#!/usr/bin/env python3
"""Make the test and benchmark image corpus from real photos bundled with scikit-image (no download).

Sets (deterministic for a given seed):
  imagenet/  ImageNet-size JPEGs (500x375 and 375x500), distinct crops of the photos
  phone/     12 MP phone-size JPEGs (4032x3024), 2-5 MB each (mild sensor-like grain)
  mixed/     PNG, grayscale, RGBA, palette GIF, WEBP, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG,
             assorted sizes
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Photos shipped inside the scikit-image wheel (its data folder), not fetched.
PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "brick.png", "grass.png",
          "gravel.png")
CORPUS_VERSION = "1"
PHONE_SIZE = (4032, 3024)


def source_photos() -> list[Image.Image]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def _random_view(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A distinct crop of the photo, flipped at random, resized to ``size``."""
    width, height = photo.size
    aspect = size[0] / size[1]
    crop_w = min(width, int(height * aspect))
    crop_w = int(crop_w * rng.uniform(0.7, 1.0))
    crop_h = int(crop_w / aspect)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view.resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def imagenet_set(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = source_photos()
    images = []
    for index in range(count):
        size = (500, 375) if index % 4 else (375, 500)
        images.append(encode(_random_view(photos[index % len(photos)], size, rng), "JPEG", quality=90))
    return images


def phone_set(count: int, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = source_photos()
    images = []
    for index in range(count):
        view = np.asarray(_random_view(photos[index % len(photos)], PHONE_SIZE, rng), dtype=np.float32)
        grain = rng.normal(0.0, 6.0, view.shape).astype(np.float32)
        noisy = Image.fromarray(np.clip(view + grain, 0, 255).astype(np.uint8))
        images.append(encode(noisy, "JPEG", quality=92))
    return images


DECODE_SCALE_SIZES = ((640, 427), (1024, 683), (1600, 1200), (2592, 1944), (4032, 3024))


def sized_set(sizes: tuple[tuple[int, int], ...] = DECODE_SCALE_SIZES, per_size: int = 12,
              seed: int = 3) -> dict[str, bytes]:
    """Photos from 0.3 to 12 MP, named by their size (e.g. 1024x683_05.jpg), with the phone set's grain."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    images = {}
    for width, height in sizes:
        for index in range(per_size):
            size = (width, height) if index % 3 else (height, width)
            view = np.asarray(_random_view(photos[index % len(photos)], size, rng), dtype=np.float32)
            grain = rng.normal(0.0, 4.0, view.shape).astype(np.float32)
            noisy = Image.fromarray(np.clip(view + grain, 0, 255).astype(np.uint8))
            images[f"{width}x{height}_{index:02d}.jpg"] = encode(noisy, "JPEG", quality=90)
    return images


def mixed_set(seed: int = 2) -> dict[str, bytes]:
    """One image per format/mode the handler must accept, named by what it exercises."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    base = _random_view(photos[0], (640, 480), rng)
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rotated = encode(_random_view(photos[1], (600, 400), rng), "JPEG", quality=90,
                     exif=_orientation_exif(6))
    return {
        "photo.png": encode(_random_view(photos[2], (800, 600), rng), "PNG"),
        "grey.jpg": encode(_random_view(photos[8], (512, 512), rng).convert("L"), "JPEG", quality=90),
        "rgba.png": encode(_random_view(photos[3], (300, 450), rng).convert("RGBA"), "PNG"),
        "la.png": encode(_random_view(photos[4], (350, 260), rng).convert("LA"), "PNG"),
        "palette.gif": encode(_random_view(photos[5], (400, 300), rng).convert("P"), "GIF"),
        "photo.webp": encode(_random_view(photos[6], (1024, 768), rng), "WEBP", quality=85),
        "grey16.png": encode(Image.fromarray(grey16), "PNG"),
        "cmyk.jpg": encode(_random_view(photos[7], (500, 500), rng).convert("CMYK"), "JPEG", quality=90),
        "exif_rotated.jpg": rotated,
        "small.jpg": encode(_random_view(photos[9], (120, 90), rng), "JPEG", quality=90),
        "wide.jpg": encode(_random_view(photos[10], (1600, 400), rng), "JPEG", quality=90),
        "photo.bmp": encode(_random_view(photos[11], (320, 240), rng), "BMP"),
    }


def _orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# The README's examples: scikit-image's photos as they are, re-encoded (name -> photo in its data folder).
SAMPLES = {"cat.jpg": "chelsea.png", "coffee.jpg": "coffee.png", "cameraman.jpg": "camera.png",
           "rocket.jpg": "rocket.jpg", "astronaut.png": "astronaut.png"}


def write_atomically(path: Path, payload: bytes) -> None:
    """Readers (another test process making the same files) see the old file or the whole new one, never a part."""
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_bytes(payload)
    staged.replace(path)


def write_samples(out: Path) -> Path:
    """The sample photos the README and scripts/serve.sh use (skipped when already there)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, source in SAMPLES.items():
        target = out / name
        if not target.exists():
            photo = Image.open(folder / source).convert("RGB")
            fmt = "PNG" if name.endswith(".png") else "JPEG"
            write_atomically(target, encode(photo, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    return out


def write_corpus(out: Path, imagenet: int = 64, phone: int = 32) -> Path:
    """Write the three sets under ``out`` (skipped when this version is already there)."""
    stamp = out / f".corpus-v{CORPUS_VERSION}-{imagenet}-{phone}"
    if stamp.exists():
        return out
    for name, images in (("imagenet", imagenet_set(imagenet)), ("phone", phone_set(phone))):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, payload in enumerate(images):
            write_atomically(folder / f"{name}_{index:03d}.jpg", payload)
    mixed = out / "mixed"
    mixed.mkdir(parents=True, exist_ok=True)
    for name, payload in mixed_set().items():
        write_atomically(mixed / name, payload)
    stamp.touch()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / ".cache" / "corpus")
    parser.add_argument("--imagenet", type=int, default=64, help="ImageNet-size photos")
    parser.add_argument("--phone", type=int, default=32, help="12 MP phone photos")
    args = parser.parse_args()
    out = write_corpus(args.out, args.imagenet, args.phone)
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        files = list(folder.iterdir())
        total = sum(f.stat().st_size for f in files)
        print(f"{folder}: {len(files)} files, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
