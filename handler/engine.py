"""The server-independent inference engine: payloads in, one prediction (top-k, embedding) per payload.

Pipeline per call:
  decode pool (uint8 crops, in order) -> reusable pinned uint8 staging buffer (NHWC) -> one non_blocking
  copy -> on-device normalize (mean/std pre-scaled by 255) -> model under inference_mode, in chunks of at
  most max_batch padded to a bucket -> the output stage (softmax top-k, embeddings: handler.outputs) ->
  non_blocking copy into pinned host memory.

While chunk k runs on the device, the pool keeps decoding and chunk k+1 is staged into the other buffer;
the results of chunk k are read after chunk k+1 is launched, by waiting on chunk k's own fence, which
never waits for chunk k+1. A staging buffer is rewritten only after the copy that read it has completed.
With a device decoder, the JPEGs of each max_batch slice are decoded on the GPU (their headers read in
the pool) while the pool decodes the rest.

Bad images become ImageError entries and never stop the rest; a failing chunk costs only its own images,
unless the failure left the device unusable: then ``DeviceLost`` propagates and the process must end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy
import torch

from handler.backends import ModelStep, eager_step
from handler.codecs import DEFAULT_OUTPUTS, OUTPUT_KINDS, TOPK, ImageError, Payload
from handler.config import ConfigError, HandlerConfig
from handler.device import DeviceLost, DeviceRuntime, PendingHost, StagingBuffers
from handler.device_decode import DeviceJpegDecoder
from handler.outputs import (
    Forward,
    Prediction,
    Request,
    TopK,
    outputs_on_device,
    predictions_on_host,
)
from handler.preprocess import Decoded, Preprocessor, transform_spec

logger = logging.getLogger(__name__)

ChunkOutputs = dict[str, torch.Tensor]  # output name -> tensor with one row per image of the chunk
DEFAULT_BUCKETS = (1, 8, 32)
# Without buckets (CPU), the first forward at each new batch size builds new oneDNN kernels (~1 s for
# ResNet-50 here); warm the small sizes that TorchServe's request batching produces, and max_batch.
CPU_WARMUP_SMALL_SIZES = 8


def resolve_buckets(config: HandlerConfig, device: torch.device, static_shapes: bool = False) -> tuple[int, ...]:
    """Batch sizes the model ever sees. On CUDA, and for a model step with static shapes (inductor), a few
    fixed shapes: cudnn tunes and torch.compile specializes only for those, at start-up."""
    if config.batch_buckets:
        return config.batch_buckets
    if device.type != "cuda" and not static_shapes:
        return ()
    return tuple(sorted({b for b in DEFAULT_BUCKETS if b < config.max_batch} | {config.max_batch}))


def device_decoder_for(config: HandlerConfig, device: torch.device,
                       runtime: DeviceRuntime | None = None) -> DeviceJpegDecoder | None:
    """The batched JPEG decoder on the model's GPU, when configured (auto: whenever the model is on CUDA).

    Never on the CPU: there it decodes at full size, slower than PIL's reduced-DCT decode.
    """
    if config.decode_device == "cpu" or (config.decode_device == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError("decode_device 'cuda' needs the model on CUDA; use decode_device: auto or cpu")
    return DeviceJpegDecoder(transform_spec(config), device, runtime=runtime)


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
    """The images of one forward. Batch rows: device crops first, then host crops (from the staging buffer)."""

    number: int
    staging_index: int
    staging: torch.Tensor
    device_positions: list[int] = field(default_factory=list)
    device_crops: list[torch.Tensor] = field(default_factory=list)
    host_positions: list[int] = field(default_factory=list)

    @property
    def positions(self) -> list[int]:
        """The input position of each batch row."""
        return self.device_positions + self.host_positions

    def __len__(self) -> int:
        return len(self.device_positions) + len(self.host_positions)


class InferenceEngine:
    def __init__(
        self,
        config: HandlerConfig,
        model: torch.nn.Module,
        device: torch.device,
        preprocessor: Preprocessor | None = None,
        device_decoder: DeviceJpegDecoder | None = None,
        runtime: DeviceRuntime | None = None,
        step: ModelStep | None = None,
    ) -> None:
        """``model``: the eager fp32 module; ``step``: how it runs (handler.backends; default eager, in the
        configured precision when one is named)."""
        self.config = config
        self.device = device
        self.runtime = runtime or DeviceRuntime(device, config.pin_memory)
        self.preprocessor = preprocessor or Preprocessor(config)
        self.device_decoder = device_decoder or device_decoder_for(config, device, self.runtime)
        precision = "fp32" if config.precision == "auto" else config.precision
        self.use_step(step or eager_step(model, precision, config.channels_last))
        # The width of the model's embeddings; None when it gives logits only (see handler.outputs).
        self.embedding_size: int | None = getattr(model, "embedding_size", None)
        self.last_timings = Timings()
        self.staging = StagingBuffers(self.runtime, 2, (config.max_batch, config.crop_size, config.crop_size, 3))
        self._mean = torch.tensor(config.mean, device=device).mul(255).view(1, 3, 1, 1)
        self._inv_std = torch.tensor(config.std, device=device).mul(255).reciprocal().view(1, 3, 1, 1)

    def use_step(self, step: ModelStep) -> None:
        """Serve with ``step`` from now on (warm it up before the first request)."""
        self.step = step
        self.buckets = resolve_buckets(self.config, self.device, step.static_shapes)
        if self.device.type == "cuda" and self.buckets:
            torch.backends.cudnn.benchmark = True

    def normalized(self, payloads: Sequence[Payload]) -> torch.Tensor | None:
        """The images among ``payloads`` that decode, preprocessed as requests are: float32 NCHW on the device
        (the accuracy gate's input). None when none decodes."""
        crops = [crop for crop in self.preprocessor.map(payloads) if not isinstance(crop, ImageError)]
        if not crops:
            return None
        return self.normalize(torch.from_numpy(numpy.stack(crops)).to(self.device))

    def warm_up(self) -> list[int]:
        """Run the model once per batch size it will see often, and the device decoder once per bucket, so
        no kernel set-up, compilation or decoder start-up happens in a request."""
        small = range(1, min(CPU_WARMUP_SMALL_SIZES, self.config.max_batch) + 1)
        sizes = list(self.buckets) or sorted({*small, self.config.max_batch})
        crop = self.config.crop_size
        request = self._request(self.config.topk, self.output_kinds)
        with torch.inference_mode():
            for size in sizes:
                self._forward(torch.zeros((size, crop, crop, 3), dtype=torch.uint8, device=self.device), size,
                              request)
        if self.device_decoder is not None and not self.device_decoder.warm_up(sizes):
            logger.warning("device JPEG decoding (%s) failed its start-up check; every image is decoded on the CPU",
                           self.device_decoder.backend.name)
            self.device_decoder = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sizes

    @property
    def output_kinds(self) -> frozenset[str]:
        """The outputs this model can give: top-k always, embeddings when it has a Linear head."""
        return frozenset(OUTPUT_KINDS) if self.embedding_size else frozenset({TOPK})

    def predict(self, payloads: Sequence[Payload], topk: int | None = None) -> list[TopK | ImageError]:
        """One result per payload, in order: its top-k, or the ImageError that explains its failure."""
        return [result if isinstance(result, ImageError) else result[TOPK]
                for result in self.predict_outputs(payloads, topk, DEFAULT_OUTPUTS)]

    def predict_outputs(self, payloads: Sequence[Payload], topk: int | None = None,
                        kinds: frozenset[str] = DEFAULT_OUTPUTS) -> list[Prediction | ImageError]:
        """One result per payload, in order: {kind: value} for the output kinds asked for (one forward serves
        them all), or the ImageError that explains the image's failure.

        Raises DeviceLost when a failure left the device unusable.
        """
        unavailable = set(kinds) - self.output_kinds
        if unavailable:
            raise ValueError(f"this model cannot give {', '.join(sorted(unavailable))}")
        request = self._request(topk or self.config.topk, frozenset(kinds))
        timings = Timings(images=len(payloads))
        results: list[Prediction | ImageError | None] = [None] * len(payloads)
        try:
            with torch.inference_mode():
                self._run(payloads, request, results, timings)
        except DeviceLost:
            raise
        except Exception as error:  # a device error can surface anywhere (a stream sync, an event): judge it too
            self.runtime.check_after_failure(error)
            raise
        for result in results:
            if isinstance(result, ImageError):
                timings.rejected[result.status] = timings.rejected.get(result.status, 0) + 1
        self.last_timings = timings
        return results  # type: ignore[return-value]

    def _request(self, topk: int, kinds: frozenset[str]) -> Request:
        return Request(kinds=kinds, topk=topk, normalize_embeddings=self.config.embedding_normalize)

    def _run(self, payloads: Sequence[Payload], request: Request, results: list, timings: Timings) -> None:
        """Launch chunk k, then collect chunk k-1: its results are read while chunk k runs."""
        pending: tuple[_Chunk, PendingHost] | None = None
        for chunk in self._chunks(self._decoded(payloads), results, timings):
            started = time.perf_counter()
            launched = self._guarded(self._launch, chunk, results, chunk, request)
            if pending is not None:
                self._guarded(self._collect, pending[0], results, *pending, results, request)
            pending = None if launched is None else (chunk, launched)
            timings.inference += time.perf_counter() - started
        if pending is not None:
            started = time.perf_counter()
            self._guarded(self._collect, pending[0], results, *pending, results, request)
            timings.inference += time.perf_counter() - started

    def _decoded(self, payloads: Sequence[Payload]) -> Iterator[Decoded | torch.Tensor]:
        """Crops in input order. With a device decoder, one max_batch slice at a time (lazily, so slice k+1
        is decoded after chunk k was launched): headers are read in the pool, the payloads the decoder will
        not take are submitted to the pool at once, the JPEGs are decoded on the device meanwhile, and any
        it routes back join the pool's queue."""
        if self.device_decoder is None:
            yield from self.preprocessor.map(payloads)
            return
        for start in range(0, len(payloads), self.config.max_batch):
            part = payloads[start: start + self.config.max_batch]
            headers = self.preprocessor.call_each(self.device_decoder.inspect, part)
            on_cpu = self.preprocessor.map([p for p, header in zip(part, headers, strict=True) if header is None])
            on_device = self.device_decoder.decode(part, headers)
            routed = self.preprocessor.map([p for p, header, crop in zip(part, headers, on_device, strict=True)
                                            if header is not None and crop is None])
            for header, crop in zip(headers, on_device, strict=True):
                if crop is not None:
                    yield crop
                else:
                    yield next(on_cpu if header is None else routed)

    def _chunks(
        self, decoded: Iterable[Decoded | torch.Tensor], results: list, timings: Timings
    ) -> Iterator[_Chunk]:
        """Group good crops into chunks of at most max_batch; host crops are written into a staging buffer."""
        chunk = self._new_chunk(0)
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
            elif isinstance(item, torch.Tensor):  # decoded on the device
                chunk.device_positions.append(position)
                chunk.device_crops.append(item)
            else:
                chunk.staging[len(chunk.host_positions)].numpy()[...] = item
                chunk.host_positions.append(position)
            if len(chunk) == self.config.max_batch:
                yield chunk
                chunk = self._new_chunk(chunk.number + 1)
            position += 1
        if len(chunk):
            yield chunk

    def _new_chunk(self, number: int) -> _Chunk:
        index, staging = self.staging.take()  # waits until the copy that last read this buffer completed
        return _Chunk(number=number, staging_index=index, staging=staging)

    def _launch(self, chunk: _Chunk, request: Request) -> PendingHost:
        outputs = self._forward(self._assemble(chunk), len(chunk), request)
        return self.runtime.to_host(outputs, f"results[{chunk.number}]")

    def _assemble(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk as one uint8 NHWC batch on the device, padded to its bucket: one stack of the device
        crops, one non_blocking copy of the host crops, no per-row copies and no pageable transfers."""
        count, on_device = len(chunk), len(chunk.device_crops)
        bucket = bucket_for(count, self.buckets)
        host = chunk.staging[: len(chunk.host_positions)]
        if not chunk.device_crops and bucket == count:
            batch = host.to(self.device, non_blocking=True)
        else:
            batch = torch.empty((bucket, *chunk.staging.shape[1:]), dtype=torch.uint8, device=self.device)
            if chunk.device_crops:
                torch.stack(chunk.device_crops, out=batch[:on_device])
            if chunk.host_positions:
                batch[on_device:count].copy_(host, non_blocking=True)
            if bucket > count:
                batch[count:].zero_()
        if chunk.host_positions:
            self.staging.sent(chunk.staging_index)
        return batch

    def normalize(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the device -> normalized float32 NCHW (input left untouched); the model step casts it
        to its own precision."""
        # NHWC permuted to NCHW is already channels_last in memory: no copy needed for it.
        images = batch_nhwc.permute(0, 3, 1, 2).float().sub_(self._mean).mul_(self._inv_std)
        if not self.config.channels_last:
            images = images.contiguous()
        return images

    def _forward(self, batch_nhwc: torch.Tensor, count: int, request: Request) -> ChunkOutputs:
        images = self.normalize(batch_nhwc)
        with torch.inference_mode():
            output = self.step(images)
        features, logits = output if isinstance(output, tuple) else (None, output)
        forward = Forward(logits[:count], None if features is None else features[:count])
        return outputs_on_device(forward, request)

    def _guarded(self, step, chunk: _Chunk, results: list, *args):
        """Run one device step; if it fails, only that chunk's images get a 500 and the rest go on, unless
        the device is lost (DeviceLost propagates)."""
        try:
            return step(*args)
        except Exception as error:  # any model/device failure: contained to this chunk if the device survived
            self.runtime.check_after_failure(error)
            logger.exception("inference failed for a chunk of %d images", len(chunk))
            for position in chunk.positions:
                results[position] = ImageError(500, "inference failed for this image; see the server log")
            return None

    @staticmethod
    def _collect(chunk: _Chunk, pending: PendingHost, results: list, request: Request) -> None:
        predictions = predictions_on_host(pending.lists(), request.kinds, len(chunk))
        for position, prediction in zip(chunk.positions, predictions, strict=True):
            results[position] = prediction

    def close(self) -> None:
        self.preprocessor.close()
