"""The per-image decode/transform against the full-decode reference, on real photos."""

import io

import numpy as np
import pytest
import torch
from hostile import jpeg_declaring, png_declaring
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from reference import IMAGENET_MEAN, IMAGENET_STD, reference_tensor

from handler.codecs import ImageError
from handler.imaging import TransformSpec, crop_box, decode_and_transform, resized_size

SPEC = TransformSpec(resize_size=256, crop_size=224, max_image_pixels=50_000_000,
                     allowed_formats=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"))
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step, in normalized units


def normalized(crop: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def max_difference(payloads: list[bytes], spec: TransformSpec = SPEC) -> tuple[float, float]:
    diffs = [(normalized(decode_and_transform(p, spec)) - reference_tensor(p)).abs() for p in payloads]
    return max(d.max().item() for d in diffs), max(d.mean().item() for d in diffs)


def test_torchvision_geometry():
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 256) == (256, 341)
    left, top, right, bottom = crop_box(500, 375, 256, 224)
    assert right - left == pytest.approx(224 * 500 / 341)
    assert bottom - top == pytest.approx(224 * 375 / 256)


def test_imagenet_size_photos_match_reference_within_one_level(imagenet_photos, record_property):
    worst, mean = max_difference(imagenet_photos[:16])
    record_property("imagenet_max_abs_diff", worst)
    print(f"\n500x375 vs reference: max abs diff {worst:.4f}, mean {mean:.5f} (normalized units)")
    assert worst <= ONE_LEVEL * 1.01
    assert mean < 0.001


def test_phone_photos_full_decode_matches_reference(phone_photos):
    spec = TransformSpec(**{**SPEC.__dict__, "reduced_jpeg_decode": False})
    worst, _ = max_difference(phone_photos[:2], spec)
    assert worst <= ONE_LEVEL * 1.01


def test_phone_photos_reduced_dct_decode_stays_close_to_reference(phone_photos, record_property):
    worst, mean = max_difference(phone_photos[:4])
    record_property("phone_max_abs_diff", worst)
    print(f"\n4032x3024 (reduced DCT decode) vs reference: max abs diff {worst:.4f}, mean {mean:.5f}")
    assert worst < 0.35  # about 18 uint8 levels at the worst pixel
    assert mean < 0.02


def test_reduced_dct_decode_is_used_for_big_jpegs_only(phone_photos, mixed_images, monkeypatch):
    decoded_sizes = []
    original_draft = JpegImageFile.draft

    def recording_draft(image, mode, size):
        result = original_draft(image, mode, size)
        decoded_sizes.append(image.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", recording_draft)
    decode_and_transform(phone_photos[0], SPEC)
    decode_and_transform(mixed_images["grey.jpg"], SPEC)
    assert decoded_sizes == [(1008, 756), (512, 512)]  # 12 MP at 1/4 scale (>= 2 x 256); 512 px left whole


@pytest.mark.parametrize("name", ["photo.png", "grey.jpg", "rgba.png", "la.png", "palette.gif", "photo.webp",
                                  "cmyk.jpg", "small.jpg", "wide.jpg", "photo.bmp", "exif_rotated.jpg"])
def test_every_mode_and_format_matches_reference(mixed_images, name):
    worst, _ = max_difference([mixed_images[name]])
    assert worst <= ONE_LEVEL * 1.01, name


def test_exif_orientation_is_applied(mixed_images):
    payload = mixed_images["exif_rotated.jpg"]
    ours = decode_and_transform(payload, SPEC)
    unrotated = Image.open(io.BytesIO(payload))
    assert unrotated.size == (600, 400)  # stored landscape, displayed portrait (orientation 6)
    stored = np.asarray(unrotated.convert("RGB").resize((224, 224)))
    assert np.abs(ours.astype(int) - stored.astype(int)).mean() > 10


def test_sixteen_bit_grey_keeps_its_top_byte():
    grey = np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)
    as_png = {}
    for name, image in (("L", Image.fromarray(grey, "L")),
                        ("I;16", Image.fromarray(grey.astype(np.uint16) * 257))):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        as_png[name] = buffer.getvalue()
    assert Image.open(io.BytesIO(as_png["I;16"])).mode.startswith("I")
    np.testing.assert_array_equal(decode_and_transform(as_png["I;16"], SPEC), decode_and_transform(as_png["L"], SPEC))


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (300, 300), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    crop = decode_and_transform(buffer.getvalue(), SPEC)
    assert tuple(crop[100, 100]) == (255, 0, 0)


def test_input_bytes_are_not_modified(imagenet_photos):
    payload = bytearray(imagenet_photos[0])
    before = bytes(payload)
    decode_and_transform(bytes(payload), SPEC)
    assert payload == before


@pytest.mark.parametrize(
    ("make", "status", "fragment"),
    [
        (lambda photos: png_declaring(10_000, 6_000), 413, "the limit is 50000000"),
        (lambda photos: png_declaring(60_000, 60_000), 413, "pixels"),
        (lambda photos: jpeg_declaring(photos[0], 9_000, 9_000), 413, "pixels"),
        (lambda photos: photos[0][: len(photos[0]) // 2], 400, "corrupt or truncated"),
        (lambda photos: b"hello, I am not an image", 415, "unsupported or unrecognised image format"),
        (lambda photos: b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", 415, "unsupported"),
        (lambda photos: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported"),
        (lambda photos: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "unsupported"),
        (lambda photos: photos[0][:2] + b"\x00" * 500, 415, "corrupt header"),
    ],
)
def test_bad_images_get_a_clear_error_instead_of_an_exception(imagenet_photos, make, status, fragment):
    result = decode_and_transform(make(imagenet_photos), SPEC)
    assert isinstance(result, ImageError), result
    assert result.status == status
    assert fragment in result.message


def test_formats_outside_the_allowed_list_are_refused(mixed_images):
    spec = TransformSpec(**{**SPEC.__dict__, "allowed_formats": ("JPEG",)})
    result = decode_and_transform(mixed_images["photo.png"], spec)
    assert isinstance(result, ImageError) and result.status == 415
