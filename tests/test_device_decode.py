"""The device JPEG decoder against the CPU path and the reference, on real photos: routing, bisection, checks of
decoded images, sticky-error classification, bounded resize memory, the start-up self-check.

Everything here runs the real torchvision decoder on the CPU (``device=cpu``); the CUDA versions are in
tests/test_gpu.py. The resize is the float32 computation torchvision runs for uint8 on CUDA.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from handler import device_decode
from handler.codecs import ImageError
from handler.device import DeviceLost
from handler.device_decode import DeviceJpegDecoder, JpegBackend, resize_and_crop, torchvision_backend
from handler.imaging import EXIF_ORIENTATION_TAG, TransformSpec, decode_and_transform, resized_size
from tests.harness.reference import IMAGENET_MEAN, IMAGENET_STD, eval_transform, reference_tensor
from tests.harness.simulated_device import SimulatedRuntime, out_of_memory, sticky_error

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec.*:DeprecationWarning")  # torchvision.io, 0.29+

SPEC = TransformSpec(resize_size=256, crop_size=224, max_image_pixels=50_000_000,
                     allowed_formats=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"), reduced_jpeg_decode=False)
CPU = torch.device("cpu")
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step, in normalized units

# Measured on this corpus (64 ImageNet-size + 6 phone photos, torchvision 0.29 CPU decoder, float32 resize as on
# CUDA): at most 1 level from the PIL full-decode path (worst image mean 0.17 levels: PIL rounds between its two
# passes), at most 1 level (0.0175 normalized) from the reference. Bounds: twice that, for other libjpeg builds.
MAX_LEVELS_VS_CPU_PATH = 2
MAX_NORMALIZED_VS_REFERENCE = 2 * ONE_LEVEL
MAX_MEAN_LEVELS_VS_CPU_PATH = 0.35


def decoder(backend: JpegBackend | None = None, runtime: SimulatedRuntime | None = None,
            spec: TransformSpec = SPEC) -> DeviceJpegDecoder:
    return DeviceJpegDecoder(spec, CPU, backend=backend or torchvision_backend(), runtime=runtime)


def normalized(crop: torch.Tensor) -> torch.Tensor:
    tensor = crop.permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def cpu_path(payload: bytes, spec: TransformSpec = SPEC) -> torch.Tensor:
    crop = decode_and_transform(payload, spec)
    assert not isinstance(crop, ImageError), crop
    return torch.from_numpy(np.array(crop))


def differences(payloads: list[bytes], crops: list[torch.Tensor | None]) -> tuple[int, float, float]:
    """Worst level vs the CPU path, worst per-image mean level vs it, worst normalized vs the reference."""
    worst_levels, worst_mean, worst_normalized = 0, 0.0, 0.0
    for payload, crop in zip(payloads, crops, strict=True):
        assert crop is not None
        levels = (crop.cpu().int() - cpu_path(payload).int()).abs()
        worst_levels = max(worst_levels, int(levels.max()))
        worst_mean = max(worst_mean, levels.float().mean().item())
        reference = reference_tensor(payload, eval_transform(SPEC.resize_size, SPEC.crop_size))
        worst_normalized = max(worst_normalized, (normalized(crop.cpu()) - reference).abs().max().item())
    return worst_levels, worst_mean, worst_normalized


def assert_crop(crop: torch.Tensor | None) -> torch.Tensor:
    assert crop is not None
    assert crop.shape == (SPEC.crop_size, SPEC.crop_size, 3)
    assert crop.dtype == torch.uint8 and crop.is_contiguous()
    return crop


def reencoded(payload: bytes, **options) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(payload)).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def with_orientation(payload: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return reencoded(payload, exif=exif.tobytes())


def corrupt_scan(payload: bytes) -> bytes:
    """Valid header and end marker, broken entropy data: both decoders refuse it (a bogus Huffman table)."""
    start = payload.index(b"\xff\xda") + 2000
    return payload[:start] + b"\xff\xc4" * 50 + payload[start + 100:]


class Recording:
    """A backend wrapper that records the size of every decode call (and optionally fails some)."""

    def __init__(self, backend: JpegBackend | None = None, fails=lambda data: None) -> None:
        self.inner = backend or torchvision_backend()
        self.fails = fails
        self.calls: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def backend(self) -> JpegBackend:
        return JpegBackend("recording", self._decode_batch, self.inner.upright)

    def _decode_batch(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.calls.append(len(data))
        self.inputs.extend(data)
        error = self.fails(data)
        if error is not None:
            raise error
        return self.inner.decode_batch(data, device)


@pytest.mark.parametrize(("photos", "count"), [("imagenet_photos", 16), ("phone_photos", 3)])
def test_crops_match_the_cpu_path_and_the_reference(request, photos, count, record_property):
    payloads = request.getfixturevalue(photos)[:count]
    crops = decoder().decode(payloads)
    for crop in crops:
        assert_crop(crop)
    levels, mean, worst = differences(payloads, crops)
    record_property(f"{photos}_device_decode_max_levels", levels)
    print(f"\n{photos}: vs CPU path max {levels} levels (worst image mean {mean:.4f}); "
          f"vs reference max {worst:.4f} normalized")
    assert levels <= MAX_LEVELS_VS_CPU_PATH
    assert mean <= MAX_MEAN_LEVELS_VS_CPU_PATH
    assert worst <= MAX_NORMALIZED_VS_REFERENCE * 1.01


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_banded_resize_equals_torchvisions_float_resize(imagenet_photos, phone_photos, interpolation, monkeypatch):
    """What torchvision computes for uint8 on CUDA (float32, antialias, round), with bands of a few rows."""
    monkeypatch.setattr(device_decode, "RESIZE_BAND_BYTES", 7 * 500 * 3 * 4)  # 7-row bands: many band edges
    spec = TransformSpec(**{**SPEC.__dict__, "interpolation": interpolation})
    for payload in [imagenet_photos[0], imagenet_photos[4], phone_photos[0]]:  # landscape, portrait, 12 MP
        image = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        width, height = resized_size(image.shape[-1], image.shape[-2], spec.resize_size)
        expected = F.resize(image.float(), [height, width], interpolation=InterpolationMode(interpolation),
                            antialias=True)
        expected = F.center_crop(expected, [spec.crop_size] * 2).clamp(0, 255).round().to(torch.uint8)
        assert torch.equal(resize_and_crop(image, spec), expected.permute(1, 2, 0))


def test_resize_of_a_12_mp_image_needs_no_full_size_float_copy():
    """A float copy of a 12 MP image is 146 MB; no single step of the resize may allocate more than 32 MB."""
    image = torch.randint(0, 256, (3, 3024, 4032), dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        resize_and_crop(image, SPEC)
    largest = max(event.cpu_memory_usage for event in profiler.events())
    assert 0 < largest <= 32 * 2**20, f"{largest / 2**20:.0f} MB in one step"


def test_batched_equals_one_by_one(imagenet_photos, phone_photos, mixed_images):
    payloads = [imagenet_photos[0], mixed_images["photo.png"], phone_photos[0], mixed_images["grey.jpg"],
                imagenet_photos[3], mixed_images["exif_rotated.jpg"]]
    batched = decoder().decode(payloads)
    alone = [decoder().decode([payload])[0] for payload in payloads]
    for together, single in zip(batched, alone, strict=True):
        assert (together is None) == (single is None)
        if together is not None:
            assert torch.equal(together, single)


def test_corrupt_and_truncated_jpegs_are_routed_before_decoding(imagenet_photos):
    good = imagenet_photos[:3]
    corrupt, truncated = corrupt_scan(good[1]), good[2][: len(good[2]) // 2]
    assert isinstance(decode_and_transform(corrupt, SPEC), ImageError)  # the CPU path gives them their 400
    assert isinstance(decode_and_transform(truncated, SPEC), ImageError)
    recording = Recording()
    results = decoder(recording.backend()).decode([good[0], corrupt, good[1], truncated, good[2]])
    assert [result is None for result in results] == [False, True, False, True, False]
    assert recording.calls == [3]  # one call for the good ones: the structural scan caught the others
    expected = decoder().decode(good)
    for result, crop in zip([results[0], results[2], results[4]], expected, strict=True):
        assert torch.equal(assert_crop(result), crop)


def test_a_failed_batch_is_bisected_down_to_the_failing_image(imagenet_photos):
    """A decoder that fails any call containing the 6th payload, as nvJPEG fails a whole batch."""
    payloads = imagenet_photos[:16]
    bad_length = len(payloads[5])

    def fails(data):
        return RuntimeError("nvjpeg: decode failed") if any(len(item) == bad_length for item in data) else None

    recording = Recording(fails=fails)
    results = decoder(recording.backend()).decode(payloads)
    assert [result is None for result in results] == [index == 5 for index in range(16)]
    assert recording.calls == [16, 8, 4, 4, 2, 1, 1, 2, 8]  # not 16 + 16 single calls


def test_progressive_jpegs_go_to_the_cpu_path_undecoded(imagenet_photos, phone_photos):
    progressive = [reencoded(imagenet_photos[0], progressive=True), reencoded(phone_photos[0], progressive=True)]
    recording = Recording()
    assert decoder(recording.backend()).decode([*progressive, imagenet_photos[1]])[:2] == [None, None]
    assert recording.calls == [1]


def test_the_payload_reaches_the_decoder_without_a_copy(imagenet_photos):
    payloads = [imagenet_photos[0], bytearray(imagenet_photos[1])]
    recording = Recording()
    decoder(recording.backend()).decode(payloads)
    addresses = [np.frombuffer(payload, dtype=np.uint8).ctypes.data for payload in payloads]
    assert [tensor.data_ptr() for tensor in recording.inputs] == addresses


def test_a_blank_or_misshapen_decode_is_routed(imagenet_photos, caplog):
    """A hardware decoder may skip an image and still report success: its output is then never trusted."""
    real = torchvision_backend()

    def skips_the_second(data, device):
        decoded = real.decode_batch(data, device)
        return [decoded[0], torch.zeros_like(decoded[1]), *decoded[2:]]

    results = decoder(JpegBackend("skips", skips_the_second, upright=False)).decode(imagenet_photos[:3])
    assert [result is None for result in results] == [False, True, False]
    assert "contradict their header or are blank" in caplog.text


@pytest.mark.parametrize("broken", [
    lambda data, device: [],  # wrong count
    lambda data, device: [torch.zeros((3, 2, 2), dtype=torch.uint8) for _ in data],  # size differs from header
    lambda data, device: [torch.zeros((1, 375, 500), dtype=torch.uint8) for _ in data],  # one channel
])
def test_a_misbehaving_decoder_routes_instead_of_raising(imagenet_photos, broken):
    assert decoder(JpegBackend("broken", broken, upright=False)).decode(imagenet_photos[1:3]) == [None, None]


def test_a_lost_device_raises_instead_of_routing(imagenet_photos):
    recording = Recording(fails=lambda data: sticky_error())
    with pytest.raises(DeviceLost):
        decoder(recording.backend(), SimulatedRuntime(lost=True)).decode(imagenet_photos[:4])
    assert recording.calls == [4]  # no bisection on a dead device


def test_out_of_memory_and_survivable_errors_are_routed_without_ending_anything(imagenet_photos):
    lost = SimulatedRuntime(lost=True)
    oom = Recording(fails=lambda data: out_of_memory() if len(data) > 1 else None)
    assert all(crop is not None for crop in decoder(oom.backend(), lost).decode(imagenet_photos[:2]))
    assert oom.calls == [2, 1, 1] and ("probe",) not in lost.log  # out of memory: smaller calls, no probe
    healthy = SimulatedRuntime()
    failing = Recording(fails=lambda data: RuntimeError("nvjpeg: unsupported"))
    assert decoder(failing.backend(), healthy).decode(imagenet_photos[:1]) == [None]
    assert healthy.log.count(("probe",)) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_the_cpu_path(imagenet_photos, orientation):
    payload = with_orientation(imagenet_photos[1], orientation)  # 500x375: transposes change the shape
    crop = assert_crop(decoder().decode([payload])[0])
    assert (crop.int() - cpu_path(payload).int()).abs().max() <= MAX_LEVELS_VS_CPU_PATH


def upright_backend() -> JpegBackend:
    """A backend that applies the EXIF orientation itself, as TorchCodec's decode_jpeg does."""
    def decode_batch(data, device):
        return [decode_jpeg(item, apply_exif_orientation=True) for item in data]
    return JpegBackend("upright", decode_batch, upright=True)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_backend_that_orients_itself_is_not_rotated_twice(imagenet_photos, orientation):
    payload = with_orientation(imagenet_photos[1], orientation)
    crop = assert_crop(decoder(upright_backend()).decode([payload])[0])
    assert (crop.int() - cpu_path(payload).int()).abs().max() <= MAX_LEVELS_VS_CPU_PATH


def test_start_up_self_check_accepts_a_correct_backend_and_rejects_a_misdeclared_one():
    recording = Recording()
    assert decoder(recording.backend()).warm_up([1, 4])
    assert recording.calls == [1, 4]  # one batched call per bucket
    orients_but_says_not = JpegBackend("misdeclared", upright_backend().decode_batch, upright=False)
    assert not decoder(orients_but_says_not).warm_up([4])


@pytest.mark.parametrize(("name", "on_device"), [
    ("photo.png", False), ("palette.gif", False), ("photo.webp", False), ("photo.bmp", False),
    ("rgba.png", False), ("cmyk.jpg", False),
    ("grey.jpg", True), ("small.jpg", True), ("wide.jpg", True), ("exif_rotated.jpg", True),
])
def test_routing_by_format_and_mode(mixed_images, name, on_device):
    payload = mixed_images[name]
    crop = decoder().decode([payload])[0]
    if not on_device:
        assert crop is None
        return
    levels = (assert_crop(crop).int() - cpu_path(payload).int()).abs().max()
    assert levels <= MAX_LEVELS_VS_CPU_PATH, name


def test_extreme_aspect_ratios_are_routed(imagenet_photos):
    strip = Image.open(io.BytesIO(imagenet_photos[0])).resize((4000, 400))
    buffer = io.BytesIO()
    strip.save(buffer, "JPEG", quality=90)
    assert decoder().decode([buffer.getvalue()]) == [None]


def test_unknown_orientation_value_is_routed(imagenet_photos):
    assert decoder().decode([with_orientation(imagenet_photos[0], 9)]) == [None]


def test_errors_oversize_and_refused_formats_are_routed(imagenet_photos):
    photo = imagenet_photos[0]  # 375x500
    error = ImageError(413, "too big")
    assert decoder().decode([error, b"", b"\xff\xd8\xff" + b"\0" * 100, b"not an image"]) == [None, None, None, None]
    small_limit = TransformSpec(**{**SPEC.__dict__, "max_image_pixels": 375 * 500 - 1})
    assert decoder(spec=small_limit).decode([photo]) == [None]
    assert isinstance(decode_and_transform(photo, small_limit), ImageError)  # the CPU path's 413
    no_jpeg = TransformSpec(**{**SPEC.__dict__, "allowed_formats": ("PNG",)})
    assert decoder(spec=no_jpeg).decode([photo]) == [None]


def test_grayscale_comes_out_with_three_equal_channels(mixed_images):
    crop = assert_crop(decoder().decode([mixed_images["grey.jpg"]])[0])
    assert torch.equal(crop[..., 0], crop[..., 1]) and torch.equal(crop[..., 1], crop[..., 2])


def test_inputs_are_not_mutated(imagenet_photos):
    payloads = [bytearray(imagenet_photos[0]), imagenet_photos[1], ImageError(400, "bad")]
    snapshot = [bytes(p) if not isinstance(p, ImageError) else p for p in payloads]
    crops = decoder().decode(payloads)  # type: ignore[arg-type]
    crops[0].fill_(0)  # writing to a result must not reach the caller's bytes either
    assert [bytes(p) if not isinstance(p, ImageError) else p for p in payloads] == snapshot


def test_empty_and_all_routed_batches_never_call_the_decoder(mixed_images):
    recording = Recording()
    assert decoder(recording.backend()).decode([]) == []
    assert decoder(recording.backend()).decode([mixed_images["photo.png"]]) == [None]
    assert recording.calls == []


def test_headers_given_by_the_caller_are_used_as_they_are(imagenet_photos, monkeypatch):
    """The engine reads headers in its pool and passes them in; decode then reads none itself."""
    inspecting = decoder()
    headers = [inspecting.inspect(payload) for payload in imagenet_photos[:2]]
    calls = []
    real = device_decode.read_header
    monkeypatch.setattr(device_decode, "read_header", lambda payload, spec: calls.append(1) or real(payload, spec))
    crops = inspecting.decode(imagenet_photos[:2], headers)
    assert calls == [] and all(crop is not None for crop in crops)
