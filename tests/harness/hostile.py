"""Bad (and awkward but valid) inputs, each with the answer a client must get for it."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring a size, with almost no pixel data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def jpeg_declaring(photo: bytes, width: int, height: int) -> bytes:
    start = photo.index(b"\xff\xc0")
    patched = bytearray(photo)
    patched[start + 5: start + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


def png_with_bad_header_crc(photo_png: bytes) -> bytes:
    data = bytearray(photo_png)
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def _flip(data: bytes, at: float, length: int = 64) -> bytes:
    start = int(len(data) * at)
    return data[:start] + bytes(b ^ 0xA5 for b in data[start:start + length]) + data[start + length:]


def damaged_images(photo_jpeg: bytes) -> dict[str, bytes]:
    """Truncated files in every accepted format, and corruption the format can detect (checksummed or
    compressed pixel data); each must be refused with 400. (Flipped bytes inside the pixel data of a JPEG,
    BMP, WEBP or uncompressed TIFF may just be other pixels: no decoder can tell.)"""
    small = Image.open(io.BytesIO(photo_jpeg)).convert("RGB").resize((240, 180))
    encoded = {
        "jpeg": _encode(small, "JPEG", quality=90), "jpeg_progressive": _encode(small, "JPEG", progressive=True),
        "png": _encode(small, "PNG"), "webp": _encode(small, "WEBP", quality=85),
        "webp_lossless": _encode(small, "WEBP", lossless=True), "bmp": _encode(small, "BMP"),
        "gif": _encode(small.convert("P"), "GIF"), "tiff": _encode(small, "TIFF"),
        "tiff_lzw": _encode(small, "TIFF", compression="tiff_lzw"),
    }
    damaged = {f"{name}_truncated_{int(keep * 100)}pct": data[: int(len(data) * keep)]
               for name, data in encoded.items() for keep in (0.9, 0.5, 0.1)}
    png = encoded["png"]
    idat = png.index(b"IDAT") + 4
    damaged["png_corrupt_idat_start"] = png[:idat + 40] + bytes(b ^ 0x5A for b in png[idat + 40: idat + 56]) + png[
        idat + 56:]
    damaged["png_corrupt_idat_middle"] = _flip(png, 0.5)
    damaged["gif_corrupt_lzw_data"] = _flip(encoded["gif"], 0.5)
    damaged["tiff_lzw_corrupt_strip"] = _flip(encoded["tiff_lzw"], 0.5)
    return damaged


def raw_hostile(photo_jpeg: bytes, max_image_bytes: int) -> dict[str, tuple[bytes, int]]:
    """Multipart-borne bad inputs: name -> (payload, expected per-image status)."""
    small = Image.open(io.BytesIO(photo_jpeg)).convert("RGB").resize((200, 150))
    png = _encode(small, "PNG")
    return {
        "zero_bytes": (b"", 400),
        "truncated_jpeg": (photo_jpeg[: len(photo_jpeg) // 3], 400),
        "plain_text": (b"just some words, not pixels", 415),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect/></svg>', 415),
        "pdf": (b"%PDF-1.7\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", 415),
        "heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, 415),
        "eps_needs_ghostscript": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n", 415),
        "ico_not_allowed": (_encode(small, "ICO"), 415),
        "png_bomb_3_6_gigapixels": (png_declaring(60_000, 60_000), 413),
        "png_over_pixel_limit": (png_declaring(10_000, 6_000), 413),
        "jpeg_bomb_header": (jpeg_declaring(photo_jpeg, 9_000, 9_000), 413),
        "png_truncated_in_pixel_data": (png[: len(png) // 2], 400),
        "png_bad_header_crc": (png_with_bad_header_crc(png), 400),
        "jpeg_marker_then_garbage": (b"\xff\xd8\xff" + b"\x13\x37" * 400, 400),
        "tiff_truncated": (_encode(small, "TIFF")[:600], 400),
        "webp_truncated": (_encode(small, "WEBP")[:200], 400),
        "gif_truncated": (_encode(small.convert("P"), "GIF")[:300], 400),
        "bmp_truncated_header": (b"BM" + b"\xff" * 60, 400),
        "null_bytes": (b"\x00" * 1000, 415),
        "over_byte_limit": (b"\xff\xd8" + b"\x00" * (max_image_bytes + 10), 413),
        **{name: (data, 400) for name, data in damaged_images(photo_jpeg).items()},
    }


def json_hostile() -> dict[str, tuple[object, int]]:
    """JSON-borne bad items: name -> (item in the "images" list, expected per-image status)."""
    return {
        "bad_base64": ("this is ** not base64 **", 400),
        "number_instead_of_string": (42, 400),
        "null_item": (None, 400),
        "object_without_b64": ({"data": "abc"}, 400),
        "data_uri_with_garbage": ("data:image/png;base64,@@@@", 400),
    }


def awkward_but_valid(photo_jpeg: bytes) -> dict[str, bytes]:
    """Inputs that look odd but must be classified."""
    base = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    frames = [base.resize((240, 180)), base.resize((240, 180)).rotate(90)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], loop=0)
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: close to the 64 KB APP1 maximum
    return {
        "animated_gif": animated.getvalue(),
        "huge_exif_block": _encode(base, "JPEG", exif=exif.tobytes(), quality=85),
        "one_pixel": _encode(base.resize((1, 1)), "PNG"),
        "extreme_aspect_4000x10": _encode(base.resize((4000, 10)), "JPEG"),
    }
