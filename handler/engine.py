"""The server-independent inference engine: payloads in, top-k predictions out, one per payload.

Pipeline per call:
  decode pool (uint8 crops, in order) -> reusable pinned uint8 staging buffer (NHWC)
  -> non_blocking copy -> on-device normalize (mean/std pre-scaled by 255) -> model under
  inference_mode, in chunks of at most max_batch -> softmax top-k.

While chunk k runs on the device, the pool keeps decoding and chunk k+1 is staged into the other
buffer; results of chunk k are read only after k+1 is launched. Bad images become ImageError
entries and never stop the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from handler.codecs import ImageError, Payload
from handler.config import ConfigError, HandlerConfig
from handler.device_decode import DeviceJpegDecoder
from handler.model import model_dtype
from handler.preprocess import Decoded, Preprocessor, transform_spec

logger = logging.getLogger(__name__)

TopK = list[tuple[int, float]]  # (class index, probability), best first
DEFAULT_CUDA_BUCKETS = (1, 8, 32)
# Without buckets (CPU), the first forward at each new batch size builds new oneDNN kernels (~1 s for
# ResNet-50 here); warm the small sizes that TorchServe's request batching produces, and max_batch.
CPU_WARMUP_SMALL_SIZES = 8


def resolve_buckets(config: HandlerConfig, device: torch.device) -> tuple[int, ...]:
    """Batch sizes the model ever sees. On CUDA, a few fixed shapes so cudnn tunes only at start-up."""
    if config.batch_buckets:
        return config.batch_buckets
    if device.type != "cuda":
        return ()
    return tuple(sorted({b for b in DEFAULT_CUDA_BUCKETS if b < config.max_batch} | {config.max_batch}))


def device_decoder_for(config: HandlerConfig, device: torch.device) -> DeviceJpegDecoder | None:
    """The batched JPEG decoder on the model's GPU, when configured (auto: whenever the model is on CUDA).

    Never on the CPU: there it decodes at full size, slower than PIL's reduced-DCT decode.
    """
    if config.decode_device == "cpu" or (config.decode_device == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError("decode_device 'cuda' needs the model on CUDA; use decode_device: auto or cpu")
    return DeviceJpegDecoder(transform_spec(config), device)


def bucket_for(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``count`` images; ``count`` itself when there are no buckets."""
    for bucket in buckets:
        if bucket >= count:
            return bucket
    return count


@dataclass
class Timings:
    """Wall-clock seconds spent in each stage of the last call (for metrics and benchmarks)."""

    decode_wait: float = 0.0
    inference: float = 0.0
    images: int = 0
    rejected: dict[int, int] = field(default_factory=dict)


@dataclass
class _Chunk:
    positions: list[int]
    host_rows: list[int]
    device_items: list[tuple[int, torch.Tensor]]
    staging: torch.Tensor


class InferenceEngine:
    def __init__(
        self,
        config: HandlerConfig,
        model: torch.nn.Module,
        device: torch.device,
        preprocessor: Preprocessor | None = None,
        device_decoder: DeviceJpegDecoder | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.dtype = model_dtype(config, device)
        self.preprocessor = preprocessor or Preprocessor(config)
        self.device_decoder = device_decoder or device_decoder_for(config, device)
        self.buckets = resolve_buckets(config, device)
        self.last_timings = Timings()
        pin = device.type == "cuda" and config.pin_memory
        shape = (config.max_batch, config.crop_size, config.crop_size, 3)
        self._staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._mean = torch.tensor(config.mean, device=device).mul(255).view(1, 3, 1, 1)
        self._inv_std = torch.tensor(config.std, device=device).mul(255).reciprocal().view(1, 3, 1, 1)
        if device.type == "cuda" and self.buckets:
            torch.backends.cudnn.benchmark = True

    def warm_up(self) -> list[int]:
        """Run the model once per batch size it will see often, so no kernel set-up happens in a request."""
        small = range(1, min(CPU_WARMUP_SMALL_SIZES, self.config.max_batch) + 1)
        sizes = list(self.buckets) or sorted({*small, self.config.max_batch})
        for size in sizes:
            staging = torch.zeros((size, self.config.crop_size, self.config.crop_size, 3), dtype=torch.uint8)
            self._forward(staging.to(self.device), size, self.config.topk)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sizes

    def predict(self, payloads: Sequence[Payload], topk: int | None = None) -> list[TopK | ImageError]:
        """One result per payload, in order: its top-k, or the ImageError that explains its failure."""
        topk = topk or self.config.topk
        timings = Timings(images=len(payloads))
        results: list[TopK | ImageError | None] = [None] * len(payloads)
        pending: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        with torch.inference_mode():
            for chunk in self._chunks(self._decoded(payloads), results, timings):
                started = time.perf_counter()
                launched = self._guarded(self._launch, chunk.positions, results, chunk, topk)
                if pending is not None:
                    self._guarded(self._collect, pending[0], results, pending, results)
                pending = None if launched is None else (chunk.positions, *launched)
                timings.inference += time.perf_counter() - started
            if pending is not None:
                started = time.perf_counter()
                self._guarded(self._collect, pending[0], results, pending, results)
                timings.inference += time.perf_counter() - started
        for result in results:
            if isinstance(result, ImageError):
                timings.rejected[result.status] = timings.rejected.get(result.status, 0) + 1
        self.last_timings = timings
        return results  # type: ignore[return-value]

    def _decoded(self, payloads: Sequence[Payload]) -> Iterator[Decoded | torch.Tensor]:
        """Crops in input order. With a device decoder, JPEGs are decoded there one max_batch slice at a
        time (lazily, so slice k+1 is decoded after chunk k was launched); the rest go to the pool."""
        if self.device_decoder is None:
            yield from self.preprocessor.map(payloads)
            return
        for start in range(0, len(payloads), self.config.max_batch):
            part = payloads[start: start + self.config.max_batch]
            on_device = self.device_decoder.decode(part)
            routed = self.preprocessor.map([p for p, crop in zip(part, on_device, strict=True) if crop is None])
            for crop in on_device:
                yield crop if crop is not None else next(routed)

    def _chunks(
        self, decoded: Iterable[Decoded | torch.Tensor], results: list, timings: Timings
    ) -> Iterator[_Chunk]:
        """Group good crops into chunks of at most max_batch, alternating the two staging buffers."""
        buffer_index = 0
        chunk = self._new_chunk(buffer_index)
        iterator = iter(decoded)
        position = 0
        while True:
            started = time.perf_counter()
            item = next(iterator, None)
            timings.decode_wait += time.perf_counter() - started
            if item is None:
                break
            if isinstance(item, ImageError):
                results[position] = item
            else:
                row = len(chunk.positions)
                chunk.positions.append(position)
                if isinstance(item, torch.Tensor) and item.device.type != "cpu":
                    chunk.device_items.append((row, item))
                else:
                    chunk.staging[len(chunk.host_rows)].numpy()[...] = item
                    chunk.host_rows.append(row)
                if len(chunk.positions) == self.config.max_batch:
                    yield chunk
                    buffer_index ^= 1
                    chunk = self._new_chunk(buffer_index)
            position += 1
        if chunk.positions:
            yield chunk

    def _new_chunk(self, buffer_index: int) -> _Chunk:
        return _Chunk(positions=[], host_rows=[], device_items=[], staging=self._staging[buffer_index])

    def _launch(self, chunk: _Chunk, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(chunk.positions)
        bucket = bucket_for(count, self.buckets)
        host = chunk.staging[: len(chunk.host_rows)]
        if not chunk.device_items and bucket == count:
            batch = host.to(self.device, non_blocking=True)
        else:
            batch = torch.zeros((bucket, *host.shape[1:]), dtype=torch.uint8, device=self.device)
            if chunk.host_rows:
                rows = torch.tensor(chunk.host_rows, device=self.device)
                batch.index_copy_(0, rows, host.to(self.device, non_blocking=True))
            for row, item in chunk.device_items:
                batch[row].copy_(item)
        return self._forward(batch, count, topk)

    def normalize(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the device -> normalized NCHW in the model's dtype (input left untouched)."""
        # NHWC permuted to NCHW is already channels_last in memory: no copy needed for it.
        images = batch_nhwc.permute(0, 3, 1, 2).float().sub_(self._mean).mul_(self._inv_std)
        if not self.config.channels_last:
            images = images.contiguous()
        return images.to(self.dtype)

    def _forward(self, batch_nhwc: torch.Tensor, count: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.normalize(batch_nhwc)
        with torch.inference_mode():
            logits = self.model(images)
        probabilities = torch.softmax(logits[:count].float(), dim=1)
        return torch.topk(probabilities, topk, dim=1)

    @staticmethod
    def _guarded(step, positions: list[int], results: list, *args):
        """Run one device step; if it fails, only that chunk's images get a 500, the rest go on."""
        try:
            return step(*args)
        except Exception:  # any model/device failure: contain it to this chunk
            logger.exception("inference failed for a chunk of %d images", len(positions))
            for position in positions:
                results[position] = ImageError(500, "inference failed for this image; see the server log")
            return None

    @staticmethod
    def _collect(pending: tuple[list[int], torch.Tensor, torch.Tensor], results: list) -> None:
        positions, scores, indices = pending
        rows = zip(positions, scores.cpu().tolist(), indices.cpu().tolist(), strict=True)
        for position, row_scores, row_indices in rows:
            results[position] = list(zip(row_indices, row_scores, strict=True))

    def close(self) -> None:
        self.preprocessor.close()
