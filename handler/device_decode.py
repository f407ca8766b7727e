"""Batched JPEG decode, resize and center crop on the model's device, with per-image routing.

Only JPEGs that are safe to decode there go to the device: ``inspect`` answers ``None`` for every other
payload, meaning "send this one to the CPU path" (``handler.imaging``), which then produces the right
crop or the right ``ImageError``. Routing to the CPU is never wrong, only slower, so every doubt routes:
progressive, arithmetic-coded, 12-bit, multi-scan or structurally broken files, CMYK, extreme aspect
ratios, and any decoded image that disagrees with its header or is blank.

The eligible JPEGs of a slice are decoded in one batched call: TorchCodec's ``decode_jpeg`` when it is
installed (maintained; torchvision's decoders are deprecated since 0.29), torchvision's otherwise. A bad
image fails that whole call, so a failed call is split in halves until the culprits are isolated.

Stream ordering (CUDA): nvJPEG's hardware engine may write its outputs before work already queued on its
stream has run (pytorch/vision#9606, torchcodec#1634), and those outputs come from PyTorch's caching
allocator, which reuses a block as soon as it is freed on the stream that allocated it. So the decoder
runs on a stream of its own that is drained (host-synchronized) before every call: the blocks that
stream's pool hands out are then idle, whatever the caller's stream still has queued, and the caller's
chunks keep running during the decode. The caller's stream then waits for the crops on the device, and
each crop is marked as used by it, so its memory is not reused before the caller has read it.

Geometry is torchvision's ``Resize(resize_size)`` (bilinear or bicubic, antialias) + ``CenterCrop(crop_size)``,
as in ``handler.imaging``, computed in float32 as torchvision does for uint8 on CUDA.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate

from handler.codecs import ImageError
from handler.device import DeviceRuntime, Fence
from handler.imaging import EXIF_ORIENTATION_TAG, TRANSPOSED_ORIENTATIONS, TransformSpec, resized_size

logger = logging.getLogger(__name__)

DecodeBatch = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

JPEG_SOI = b"\xff\xd8\xff"
SEQUENTIAL_HUFFMAN_FRAMES = frozenset({0xC0, 0xC1})  # baseline and extended sequential: what nvJPEG batches
OTHER_FRAMES = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
START_OF_SCAN, END_OF_IMAGE = 0xDA, 0xD9
DEVICE_MODES = frozenset({"L", "RGB"})  # CMYK/YCCK and anything exotic stay on the CPU
ORIENTATIONS = frozenset(range(1, 9))
MAX_ASPECT_RATIO = 8  # beyond it the resized long side (and its float buffer) grows without bound
RESIZE_BAND_BYTES = 16 * 2**20  # float32 bytes of the source rows resized at a time


@dataclass(frozen=True)
class JpegBackend:
    name: str
    decode_batch: DecodeBatch
    upright: bool  # True when the backend applies the EXIF orientation itself (TorchCodec does)


def torchvision_backend() -> JpegBackend:
    """torchvision's ``decode_jpeg``: batched (one nvJPEG call) from 0.19, one image per call before."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    version = tuple(int(part) for part in torchvision.__version__.split("+")[0].split(".")[:2])

    def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if version >= (0, 19):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return [decode_jpeg(item, mode=ImageReadMode.RGB, device=device) for item in data]

    return JpegBackend(f"torchvision {torchvision.__version__}", decode_batch, upright=False)


def torchcodec_backend() -> JpegBackend | None:
    """TorchCodec's ``decode_jpeg`` (0.16+), or None when it is not installed.

    Not exercised by the tests here (TorchCodec is not installed); the warm-up self-check compares its
    crops with the CPU path at start-up and turns device decoding off if they disagree.
    """
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg
    except Exception:  # not installed, or its native libraries (FFmpeg, CUDA) do not load here
        return None

    def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(data, mode="RGB", device=device))

    return JpegBackend(f"torchcodec {getattr(torchcodec, '__version__', '?')}", decode_batch, upright=True)


def default_backend() -> JpegBackend:
    return torchcodec_backend() or torchvision_backend()


@dataclass(frozen=True)
class JpegHeader:
    width: int  # as stored, before the EXIF orientation is applied
    height: int
    orientation: int  # EXIF orientation 1..8 (1 when absent)

    def decoded_shape(self, upright: bool) -> tuple[int, int, int]:
        if upright and self.orientation in TRANSPOSED_ORIENTATIONS:
            return 3, self.width, self.height
        return 3, self.height, self.width


def entropy_data_start(payload: bytes | bytearray) -> int | None:
    """Where the scan data of a single-scan, 8-bit, sequential Huffman JPEG starts; None for any other layout."""
    position, frame = 2, None
    while position + 4 <= len(payload):
        if payload[position] != 0xFF:
            return None
        marker = payload[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        length = int.from_bytes(payload[position + 2: position + 4], "big")
        if length < 2:
            return None
        if marker in OTHER_FRAMES:
            return None  # progressive, lossless, arithmetic-coded: nvJPEG's slow path or none at all
        if marker in SEQUENTIAL_HUFFMAN_FRAMES:
            if position + 4 >= len(payload) or payload[position + 4] != 8:
                return None  # 12-bit samples
            frame = marker
        if marker == START_OF_SCAN:
            return position + 2 + length if frame is not None else None
        position += 2 + length
    return None


def scan_ends_cleanly(payload: bytes | bytearray, start: int) -> bool:
    """True when the scan data holds only stuffed bytes and restart markers up to an end-of-image marker.

    A second scan, any other marker inside the data, or a missing end (truncation) is False: such files
    get their 400 (or their pixels) from the CPU path instead of whatever a hardware decoder makes of them.
    """
    data = np.frombuffer(payload, dtype=np.uint8, offset=start)
    marks = np.flatnonzero(data[:-1] == 0xFF)
    following = data[marks + 1]
    allowed = (following == 0x00) | (following == 0xFF) | ((following >= 0xD0) & (following <= 0xD7))
    markers = following[~allowed]
    return markers.size > 0 and markers[0] == END_OF_IMAGE


def read_header(payload: bytes | bytearray | ImageError, spec: TransformSpec) -> JpegHeader | None:
    """The header of a JPEG the device may decode, or None to route the payload to the CPU path."""
    if isinstance(payload, ImageError) or not isinstance(payload, (bytes, bytearray)):
        return None
    if "JPEG" not in spec.allowed_formats or not payload.startswith(JPEG_SOI):
        return None
    start = entropy_data_start(payload)
    if start is None or not scan_ends_cleanly(payload, start):
        return None
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
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return None
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
    """(3, H, W) uint8 -> (crop, crop, 3) uint8, contiguous, on the same device.

    Antialiased resize in two separable float32 passes, width first over bands of rows, then height: the
    memory needed is one band plus the narrowed image (about 12 bytes per source pixel divided by the
    scale factor: 12 MB for 12 MP to 256 px) instead of a float copy of the whole image (146 MB for 12 MP).
    """
    height, width = image.shape[-2:]
    new_width, new_height = resized_size(width, height, spec.resize_size)
    mode = spec.interpolation
    rows = max(1, RESIZE_BAND_BYTES // (width * 3 * 4))
    narrowed = torch.empty((1, 3, height, new_width), dtype=torch.float32, device=image.device)
    for top in range(0, height, rows):
        band = image[:, top: top + rows].unsqueeze(0).float()
        narrowed[:, :, top: top + rows] = interpolate(
            band, size=(band.shape[-2], new_width), mode=mode, align_corners=False, antialias=True)
    resized = interpolate(narrowed, size=(new_height, new_width), mode=mode, align_corners=False, antialias=True)
    top = round((new_height - spec.crop_size) / 2.0)  # torchvision's center_crop offsets
    left = round((new_width - spec.crop_size) / 2.0)
    crop = resized[0, :, top: top + spec.crop_size, left: left + spec.crop_size]
    return crop.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


class _DecodeStream:
    """The decoder's own CUDA stream (made on first use), drained before each use (see the module docstring) by a
    blocking wait on the fence recorded at the end of the previous use; nothing on the CPU."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self._stream: torch.cuda.Stream | None = None
        self._drained: Fence | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[Fence]:
        """Run the enclosed work on the drained stream; yields the fence that marks its end on the device."""
        if self._stream is None:
            self._stream = self.runtime.new_stream()
        if self._drained is not None:
            self._drained.wait()
        done = self.runtime.fence("decoded")
        with self.runtime.scope(), self.runtime.on_stream(self._stream):
            yield done  # a failure raised out of here is a lost device: nothing more is queued on it
            done.record()
        self._drained = done


@dataclass
class DecodedSlice:
    """Crops made on the decoder's stream (None: route to the CPU path), and the fence after their last kernel.

    ``hand_over`` must run on the thread, and under the stream, that will read the crops."""

    crops: list[torch.Tensor | None]
    ready: Fence

    def hand_over(self, runtime: DeviceRuntime) -> list[torch.Tensor | None]:
        """Make the current stream wait for the crops on the device, and keep their memory until it has read them."""
        self.ready.order_before_current()
        runtime.keep_for_current_stream([crop for crop in self.crops if crop is not None])
        return self.crops


def as_byte_tensor(payload: bytes | bytearray) -> torch.Tensor:
    """The payload's own memory as a uint8 tensor, no copy. The decoders only read it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(payload, dtype=torch.uint8)


class DeviceJpegDecoder:
    """Payloads -> crops on ``device``, or None for each payload the CPU path must handle.

    ``inspect`` is pure host work and thread-safe: the engine runs it in its decode pool. ``decode`` runs
    on the calling thread. A failure that leaves the device unusable raises ``DeviceLost``; every other
    failure routes the images concerned to the CPU.
    """

    def __init__(self, spec: TransformSpec, device: torch.device, backend: JpegBackend | None = None,
                 runtime: DeviceRuntime | None = None) -> None:
        self.spec = spec
        self.device = device
        self.backend = backend or default_backend()
        self.runtime = runtime or DeviceRuntime(device)
        self._stream = _DecodeStream(self.runtime)

    def inspect(self, payload: bytes | bytearray | ImageError) -> JpegHeader | None:
        return read_header(payload, self.spec)

    def decode(self, payloads: Sequence[bytes | bytearray | ImageError],
               headers: Sequence[JpegHeader | None] | None = None) -> list[torch.Tensor | None]:
        """For each payload, a (crop, crop, 3) uint8 tensor on the device, or None (route to the CPU).

        ``headers``: what ``inspect`` answered for each payload, when the caller has it already. The crops are
        handed over to the calling thread's current stream.
        """
        return self.decode_slice(payloads, headers).hand_over(self.runtime)

    def decode_slice(self, payloads: Sequence[bytes | bytearray | ImageError],
                     headers: Sequence[JpegHeader | None] | None = None) -> DecodedSlice:
        """``decode`` without the hand-over: for a thread of its own, whose caller hands the crops over later.

        Any failure the device survives (out of memory in the check or the resize included) routes the images
        concerned to the CPU; a lost device raises DeviceLost.
        """
        if headers is None:
            headers = [self.inspect(payload) for payload in payloads]
        results: list[torch.Tensor | None] = [None] * len(payloads)
        eligible = [i for i, header in enumerate(headers) if header is not None]
        if not eligible:
            return DecodedSlice(results, self.runtime.fence("nothing decoded"))
        with self._stream.active() as done:
            try:
                data = [as_byte_tensor(payloads[i]) for i in eligible]  # type: ignore[arg-type]
                decoded = self._decode_all(data)
                checked = self._plausible(decoded, [headers[i] for i in eligible])  # type: ignore[misc]
                for index, image in zip(eligible, checked, strict=True):
                    if image is not None:
                        results[index] = self._finish(image, headers[index])  # type: ignore[arg-type]
            except Exception as error:  # e.g. out of memory in the plausibility check: the CPU path takes them all
                self.runtime.check_after_failure(error)
                logger.warning("device JPEG decode of %d images failed (%r); routing them to the CPU path",
                               len(eligible), error)
                results = [None] * len(payloads)
        return DecodedSlice(results, done)

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode ``data`` in one call; if it fails, each half separately, down to single images."""
        decoded = self._call(data)
        if decoded is not None:
            return list(decoded)
        if len(data) == 1:
            return [None]
        logger.debug("JPEG decode of %d images failed; splitting the batch", len(data))
        middle = len(data) // 2
        return self._decode_all(data[:middle]) + self._decode_all(data[middle:])

    def _call(self, data: list[torch.Tensor]) -> list[torch.Tensor] | None:
        try:
            decoded = list(self.backend.decode_batch(data, self.runtime.placement))
        except Exception as error:  # a bad bitstream, out of memory, ...: routed, unless the device is lost
            self.runtime.check_after_failure(error)
            logger.debug("JPEG decode of %d images failed", len(data), exc_info=True)
            return None
        return decoded if len(decoded) == len(data) else None

    def _plausible(self, decoded: list[torch.Tensor | None], headers: list[JpegHeader]) -> list[torch.Tensor | None]:
        """Keep the images whose shape matches their header and that are not blank.

        A hardware decoder has been seen to skip an image and report success; the skipped output is then
        whatever the memory held. A blank (single-valued) image is the signature of a skip into fresh memory;
        this one reduction per image and one host read per slice cannot recognise stale content.
        """
        expected = [header.decoded_shape(self.backend.upright) for header in headers]
        shaped = [image if image is not None and image.dtype == torch.uint8 and tuple(image.shape) == shape
                  else None for image, shape in zip(decoded, expected, strict=True)]
        candidates = [image for image in shaped if image is not None]
        if not candidates:
            return shaped
        extremes = self.runtime.to_host({"extremes": torch.stack([torch.stack(torch.aminmax(image))
                                                                  for image in candidates])},
                                        "plausibility").lists()["extremes"]
        blank = iter(low == high for low, high in extremes)
        plausible = [None if image is None or next(blank) else image for image in shaped]
        rejected = sum(before is not None and after is None for before, after in zip(decoded, plausible, strict=True))
        if rejected:
            logger.warning("the JPEG decoder returned %d image(s) that contradict their header or are blank; "
                           "routing them to the CPU path", rejected)
        return plausible

    def _finish(self, decoded: torch.Tensor, header: JpegHeader) -> torch.Tensor | None:
        try:
            upright = decoded if self.backend.upright else apply_orientation(decoded, header.orientation)
            return resize_and_crop(upright, self.spec)
        except Exception as error:  # e.g. out of device memory for one huge image: routed, unless the device is lost
            self.runtime.check_after_failure(error)
            logger.debug("device resize failed; routing to the CPU path", exc_info=True)
            return None

    def warm_up(self, batch_sizes: Sequence[int]) -> bool:
        """Decode tiny JPEGs once per batch size (nvJPEG and hardware decoder start-up, resize kernels, lazy
        module loading happen here, not in a request), and check the crops against the CPU path.

        Returns False when they disagree (e.g. a backend that orients images differently than declared):
        the caller should then decode everything on the CPU.
        """
        from handler.imaging import decode_and_transform

        samples = warm_up_jpegs()
        for size in batch_sizes:
            payloads = [samples[i % len(samples)] for i in range(size)]
            crops = self.decode(payloads)
            for payload, crop in zip(payloads, crops, strict=True):
                expected = decode_and_transform(payload, self.spec)
                if crop is None or isinstance(expected, ImageError):
                    logger.warning("device JPEG decode self-check: %s routed a plain JPEG", self.backend.name)
                    return False
                levels = (crop.cpu().float() - torch.from_numpy(expected.astype(np.float32))).abs().mean().item()
                if levels > WARM_UP_MAX_MEAN_LEVELS:
                    logger.warning("device JPEG decode self-check: %s differs from the CPU path by %.1f levels "
                                   "on average", self.backend.name, levels)
                    return False
        return True


# nvJPEG and libjpeg differ by a level or two per pixel (IDCT, chroma upsampling); a wrong orientation or
# channel order on the warm-up images below costs tens of levels on average.
WARM_UP_MAX_MEAN_LEVELS = 6.0


def warm_up_jpegs() -> list[bytes]:
    """Small baseline JPEGs whose every orientation error shows: a horizontal red ramp, a vertical green
    ramp and a bright corner block, stored with EXIF orientations 1, 6, 3 and 8 (and one greyscale)."""
    width, height = 384, 288
    red = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    green = np.linspace(255, 0, height, dtype=np.float32)[:, None].repeat(width, 1)
    pixels = np.stack([red, green, np.full_like(red, 64)], axis=-1)
    pixels[: height // 3, : width // 3] = 250
    image = Image.fromarray(pixels.astype(np.uint8))
    payloads = []
    for orientation in (1, 6, 3, 8):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        payloads.append(_encode_jpeg(image, exif=exif.tobytes()))
    payloads.append(_encode_jpeg(image.convert("L")))
    return payloads


def _encode_jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()

