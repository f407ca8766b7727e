"""The per-image decode/transform against the full-decode reference, on real photos."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from handler.codecs import ImageError
from handler.imaging import TransformSpec, crop_box, decode_and_transform, resized_size
from tests.harness.hostile import damaged_images, jpeg_declaring, png_declaring
from tests.harness.reference import IMAGENET_MEAN, IMAGENET_STD, eval_transform, reference_tensor

SPEC = TransformSpec(resize_size=256, crop_size=224, max_image_pixels=50_000_000,
                     allowed_formats=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"))
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step, in normalized units


def normalized(crop: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def max_difference(payloads: list[bytes], spec: TransformSpec = SPEC) -> tuple[float, float]:
    """Worst and mean |ours - reference| in normalized units, against Resize + CenterCrop of the spec's geometry."""
    transform = eval_transform(spec.resize_size, spec.crop_size, spec.interpolation)
    diffs = [(normalized(decode_and_transform(p, spec)) - reference_tensor(p, transform)).abs() for p in payloads]
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
                                  "cmyk.jpg", "small.jpg", "wide.jpg", "photo.bmp", "exif_rotated.jpg", "grey16.png"])
def test_every_mode_and_format_matches_reference(mixed_images, name):
    worst, _ = max_difference([mixed_images[name]])
    assert worst <= ONE_LEVEL * 1.01, name


@pytest.mark.parametrize(("resize_size", "crop_size", "interpolation"), [
    (256, 224, "bicubic"),  # timm's tf_efficientnet_lite0 (the demo), crop_pct 0.875
    (235, 224, "bicubic"),  # timm's resnet50: crop_pct 0.95
    (274, 240, "bicubic"),  # timm's efficientnet_b1 size
    (288, 288, "bicubic"),  # crop_pct 1.0 at 288
    (320, 300, "bicubic"),  # torchvision's efficientnet_b3
    (342, 299, "bilinear"),  # torchvision's inception_v3
    (438, 384, "bicubic"),  # a 384 px model
])
def test_model_geometries_match_resize_and_center_crop(imagenet_photos, mixed_images, resize_size, crop_size,
                                                       interpolation):
    spec = TransformSpec(**{**SPEC.__dict__, "resize_size": resize_size, "crop_size": crop_size,
                            "interpolation": interpolation})
    photos = [*imagenet_photos[:6], mixed_images["wide.jpg"], mixed_images["exif_rotated.jpg"],
              mixed_images["small.jpg"]]
    assert decode_and_transform(photos[0], spec).shape == (crop_size, crop_size, 3)
    worst, mean = max_difference(photos, spec)
    assert worst <= ONE_LEVEL * 1.01
    assert mean < 0.002  # a level here and there, never a shifted or differently filtered crop


def test_exif_orientation_is_applied(mixed_images):
    payload = mixed_images["exif_rotated.jpg"]
    ours = decode_and_transform(payload, SPEC)
    unrotated = Image.open(io.BytesIO(payload))
    assert unrotated.size == (600, 400)  # stored landscape, displayed portrait (orientation 6)
    stored = np.asarray(unrotated.convert("RGB").resize((224, 224)))
    assert np.abs(ours.astype(int) - stored.astype(int)).mean() > 10


def test_sixteen_bit_grey_keeps_its_top_byte():
    """The high byte is the picture; a decoder that kept the low byte (or clipped) would see noise or white."""
    rng = np.random.default_rng(0)
    high = rng.integers(0, 256, (300, 400), dtype=np.uint16)
    low = rng.integers(0, 256, (300, 400), dtype=np.uint16)  # unrelated to the high byte
    buffers = {}
    for name, image in (("L", Image.fromarray(high.astype(np.uint8), "L")),
                        ("I;16", Image.fromarray(high * 256 + low))):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        buffers[name] = buffer.getvalue()
    assert Image.open(io.BytesIO(buffers["I;16"])).mode.startswith("I")
    np.testing.assert_array_equal(decode_and_transform(buffers["I;16"], SPEC), decode_and_transform(buffers["L"], SPEC))


@pytest.mark.parametrize("file_format", ["PNG", "WEBP"])
def test_exif_orientation_outside_jpeg_is_applied_too(imagenet_photos, file_format):
    """A PNG or WEBP stored landscape with orientation 6 gives the crop of the same picture stored upright."""
    stored = Image.open(io.BytesIO(imagenet_photos[0])).convert("RGB").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    tagged, upright = io.BytesIO(), io.BytesIO()
    stored.save(tagged, file_format, exif=exif, lossless=True)
    stored.transpose(Image.Transpose.ROTATE_270).save(upright, file_format, lossless=True)
    ours = decode_and_transform(tagged.getvalue(), SPEC)
    assert np.array_equal(ours, decode_and_transform(upright.getvalue(), SPEC))


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (300, 300), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    crop = decode_and_transform(buffer.getvalue(), SPEC)
    assert tuple(crop[100, 100]) == (255, 0, 0)


def test_input_bytes_are_not_modified(imagenet_photos, mixed_images):
    for photo in (imagenet_photos[0], mixed_images["photo.png"], mixed_images["exif_rotated.jpg"]):
        payload = bytearray(photo)  # mutable: a decoder writing into its input would change it
        decode_and_transform(payload, SPEC)
        assert payload == photo


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
        (lambda photos: photos[0][:2] + b"\x00" * 500, 415, "unsupported or unrecognised image format"),
        (lambda photos: b"II*\x00" + b"\x00" * 40, 400, "starts like a TIFF file"),
        (lambda photos: b"RIFF\x24\x00\x00\x00WEBP" + b"\xff" * 40, 400, "starts like a WEBP file"),
        (lambda photos: b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40, 415, "unsupported or unrecognised"),
    ],
)
def test_bad_images_get_a_clear_error_instead_of_an_exception(imagenet_photos, make, status, fragment):
    result = decode_and_transform(make(imagenet_photos), SPEC)
    assert isinstance(result, ImageError), result
    assert result.status == status
    assert fragment in result.message


def test_every_damaged_image_in_every_format_is_refused_with_400(imagenet_photos):
    damaged = damaged_images(imagenet_photos[0])
    assert len(damaged) >= 30
    for name, payload in damaged.items():
        result = decode_and_transform(payload, SPEC)
        assert isinstance(result, ImageError) and result.status == 400, (name, result)
        assert "corrupt or truncated" in result.message, name


def test_formats_outside_the_allowed_list_are_refused(mixed_images):
    spec = TransformSpec(**{**SPEC.__dict__, "allowed_formats": ("JPEG",)})
    result = decode_and_transform(mixed_images["photo.png"], spec)
    assert isinstance(result, ImageError) and result.status == 415


# --- Boundaries and rare branches of the decoder ----------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (1, 1)])
def test_one_pixel_wide_or_high_images_are_decoded(size):
    """The no-pixels check must start at 0: a 1-pixel line is a valid (if odd) image."""
    crop = decode_and_transform(png_bytes(Image.new("RGB", size, (10, 200, 30))), SPEC)
    assert not isinstance(crop, ImageError), crop
    assert crop.shape == (224, 224, 3)
    assert (crop == np.array([10, 200, 30], dtype=np.uint8)).all()  # a flat colour stays that colour


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_an_image_without_pixels_is_refused_with_400(monkeypatch, size):
    """No accepted format's parser lets a 0-pixel image through today; a decoder that does must not divide by 0."""
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: Image.new("RGB", size))
    result = decode_and_transform(png_bytes(Image.new("RGB", (4, 4))), SPEC)
    assert result == ImageError(400, "image has no pixels")


def test_running_out_of_memory_while_decoding_gives_413(monkeypatch, imagenet_photos):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", out_of_memory)
    result = decode_and_transform(imagenet_photos[0], SPEC)
    assert isinstance(result, ImageError), result
    assert result.status == 413
    assert "too large to decode" in result.message


@pytest.mark.parametrize(("value", "grey"), [
    (-20.0, 0),     # below black: clipped to 0
    (0.6, 0),       # fractions are truncated, not rounded
    (99.9, 99),
    (128.0, 128),
    (254.99, 254),
    (255.0, 255),
    (300.5, 255),   # above white: clipped to 255
])
def test_float_images_are_clipped_and_truncated_to_grey(value, grey):
    """Mode F (32-bit float grey, e.g. a TIFF from a scientific camera): grey levels 0..255, clipped."""
    image = Image.fromarray(np.full((40, 60), value, dtype=np.float32), "F")
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "F"
    spec = TransformSpec(**{**SPEC.__dict__, "resize_size": 32, "crop_size": 32})
    crop = decode_and_transform(buffer.getvalue(), spec)
    assert not isinstance(crop, ImageError), crop
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert (crop == grey).all(), (value, np.unique(crop))


def test_a_float_image_keeps_its_grey_levels_in_place():
    """A gradient in mode F: each column's level (clipped, truncated) survives a same-size decode."""
    levels = np.array([-3.0, 0.0, 17.25, 64.5, 127.99, 200.0, 255.0, 511.0], dtype=np.float32)
    columns = np.repeat(levels, 8)  # 8 px per level: 64 columns
    image = Image.fromarray(np.tile(columns, (64, 1)), "F")
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    spec = TransformSpec(**{**SPEC.__dict__, "resize_size": 64, "crop_size": 64})
    crop = decode_and_transform(buffer.getvalue(), spec)
    expected = np.repeat(np.array([0, 0, 17, 64, 127, 200, 255, 255], dtype=np.uint8), 8)
    # the middle column of each 8-px band is away from the filter's reach into the next band
    np.testing.assert_array_equal(crop[32, 4::8, 0], expected[4::8])
    np.testing.assert_array_equal(crop[..., 0], crop[..., 1])
    np.testing.assert_array_equal(crop[..., 1], crop[..., 2])


def test_warnings_other_than_the_decompression_bomb_warning_are_not_silenced(monkeypatch):
    real_open = Image.open

    def open_with_a_warning(*args, **kwargs):
        warnings.warn("a plugin has something to say", UserWarning, stacklevel=2)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_with_a_warning)
    with pytest.warns(UserWarning, match="a plugin has something to say"):
        crop = decode_and_transform(png_bytes(Image.new("RGB", (8, 8))), SPEC)
    assert crop.shape == (224, 224, 3)


def test_an_image_over_pils_warning_size_is_refused_quietly():
    """90 MP passes Pillow's warning threshold (89.5 MP), below its error: our own limit answers, no warning."""
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 9_000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = decode_and_transform(png_declaring(10_000, 9_000), SPEC)
    assert isinstance(result, ImageError) and result.status == 413
