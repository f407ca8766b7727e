"""The server-independent inference engine: payloads in, one prediction (top-k, embedding) per payload.

Pipeline per call:
  decode pool (uint8 crops, in order) -> reusable pinned uint8 staging buffer (NHWC) -> one non_blocking
  copy -> on-device normalize (mean/std pre-scaled by 255) -> model under inference_mode, in chunks of at
  most max_batch padded to a bucket -> the output stage (softmax top-k, embeddings: handler.outputs) ->
  non_blocking copy into pinned host memory.

While chunk k runs on the device, the pool keeps decoding and chunk k+1 is staged into the other buffer;
the results of chunk k are read after chunk k+1 is launched, by waiting on chunk k's own fence, which
never waits for chunk k+1. A staging buffer is rewritten only after the copy that read it has completed.
With a device decoder, every header is read in the pool, every image for the CPU path is queued to the pool
at once, and the JPEGs are decoded on the GPU slice by slice by a thread of their own, on a stream of their
own: the calling thread only stages, launches and collects. On CUDA a request is cut into chunks of bucket
sizes (``plan_chunks``): at least two when it has the images for them, so that the model of the first runs
while the rest is decoded, and padding stays small.

Bad images become ImageError entries and never stop the rest; a failing chunk costs only its own images,
unless the failure left the device unusable: then ``DeviceLost`` propagates and the process must end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy
import torch

from handler.backends import ModelStep, eager_step
from handler.codecs import DEFAULT_OUTPUTS, OUTPUT_KINDS, TOPK, ImageError, Payload
from handler.config import ConfigError, HandlerConfig
from handler.device import DeviceLost, DeviceRuntime, Fence, PendingHost, StagingBuffers
from handler.device_decode import DecodedSlice, DeviceJpegDecoder, JpegHeader
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
# Powers of two: any request splits into bucket-sized chunks without padding (plan_chunks), at one warm-up (and one
# compiled graph) per bucket.
DEFAULT_CUDA_BUCKETS = (1, 2, 4, 8, 16, 32)
# What one more chunk costs, in images of model time: the price plan_chunks weighs against padding. Provisional
# (no GPU measured yet): bench/gpu_check.py reports the model time per bucket from which it follows.
LAUNCH_COST_IMAGES = 2
MIN_OVERLAP_CHUNK = 4  # a request is cut for overlap only into chunks of at least this many images
# A static-shape step on the CPU (inductor) compiles each bucket at warm-up, ~45 s each for the demo on 2 cores
# with an empty cache: fewer, coarser buckets there (plan_chunks still splits requests without padding).
DEFAULT_CPU_STATIC_BUCKETS = (1, 8, 32)
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
    defaults = DEFAULT_CUDA_BUCKETS if device.type == "cuda" else DEFAULT_CPU_STATIC_BUCKETS
    return tuple(sorted({b for b in defaults if b < config.max_batch} | {config.max_batch}))


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


def plan_chunks(count: int, buckets: Sequence[int], max_batch: int, chunks_per_request: int = 1) -> list[int]:
    """How many images each chunk of a ``count``-image request takes, largest first.

    Without buckets: max_batch at a time. With buckets: the split that computes the fewest images (padding
    included) plus LAUNCH_COST_IMAGES per chunk, with chunks of at most max_batch and, for overlap, of at most
    1/``chunks_per_request`` of the request (never below MIN_OVERLAP_CHUNK images): the model of the first chunks
    then runs while the last ones are decoded, and only the last, the smallest, is model time not overlapped.
    """
    if count <= 0:
        return []
    if not buckets:
        return [max_batch] * (count // max_batch) + ([count % max_batch] if count % max_batch else [])
    cap = min(max_batch, max(-(-count // chunks_per_request), MIN_OVERLAP_CHUNK))
    best: list[tuple[float, int]] = [(0.0, 0)] + [(float("inf"), 0)] * count  # (cost, first chunk) per image count
    for remaining in range(1, count + 1):
        for take in range(min(cap, remaining), 0, -1):  # ties go to the larger chunk
            cost = bucket_for(take, buckets) + LAUNCH_COST_IMAGES + best[remaining - take][0]
            if cost < best[remaining][0]:
                best[remaining] = (cost, take)
    plan, remaining = [], count
    while remaining:
        plan.append(best[remaining][1])
        remaining -= plan[-1]
    return sorted(plan, reverse=True)


@dataclass
class Timings:
    """Wall-clock seconds spent in each stage of the last call (for metrics and benchmarks)."""

    decode_wait: float = 0.0
    inference: float = 0.0
    images: int = 0
    rejected: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceCrop:
    """A crop decoded on the device, and the fence after which the decoder's stream has written it."""

    crop: torch.Tensor
    ready: Fence


@dataclass
class _Chunk:
    """The images of one forward. Batch rows: device crops first, then host crops (from the staging buffer)."""

    number: int
    capacity: int
    staging_index: int
    staging: torch.Tensor
    device_positions: list[int] = field(default_factory=list)
    device_crops: list[DeviceCrop] = field(default_factory=list)
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
        placement = self.runtime.placement
        self.staging = StagingBuffers(self.runtime, 2, (config.max_batch, config.crop_size, config.crop_size, 3))
        self._mean = torch.tensor(config.mean, device=placement).mul(255).view(1, 3, 1, 1)
        self._inv_std = torch.tensor(config.std, device=placement).mul(255).reciprocal().view(1, 3, 1, 1)
        self._device_decode_thread: ThreadPoolExecutor | None = None

    def use_step(self, step: ModelStep) -> None:
        """Serve with ``step`` from now on (warm it up before the first request)."""
        self.step = step
        self.buckets = resolve_buckets(self.config, self.device, step.static_shapes)

    def normalized(self, payloads: Sequence[Payload]) -> torch.Tensor | None:
        """The images among ``payloads`` that decode, preprocessed as requests are: float32 NCHW on the device
        (the accuracy gate's input). None when none decodes."""
        crops = [crop for crop in self.preprocessor.map(payloads) if not isinstance(crop, ImageError)]
        if not crops:
            return None
        return self.normalize(torch.from_numpy(numpy.stack(crops)).to(self.runtime.placement))

    def warm_up(self) -> list[int]:
        """Run the model once per batch size it will see often, and the device decoder once per bucket, so
        no kernel set-up, compilation or decoder start-up happens in a request.

        cuDNN autotuning (``cudnn.benchmark``) is switched on here, for the shapes warmed up, and only here:
        without a warm-up the first request of each bucket would pay for it.
        """
        small = range(1, min(CPU_WARMUP_SMALL_SIZES, self.config.max_batch) + 1)
        sizes = list(self.buckets) or sorted({*small, self.config.max_batch})
        crop = self.config.crop_size
        request = self._request(self.config.topk, self.output_kinds)
        if self.runtime.is_cuda and self.buckets:
            torch.backends.cudnn.benchmark = True
        with self.runtime.scope(), torch.inference_mode():
            for size in sizes:
                self._forward(torch.zeros((size, crop, crop, 3), dtype=torch.uint8, device=self.runtime.placement),
                              size, request)
            if self.device_decoder is not None and not self.device_decoder.warm_up(sizes):
                logger.warning("device JPEG decoding (%s) failed its start-up check; every image is decoded on the "
                               "CPU", self.device_decoder.backend.name)
                self.device_decoder = None
            self.runtime.synchronize()
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
            with self.runtime.scope(), torch.inference_mode():
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
        for chunk in self._chunks(self._decoded(payloads), results, timings, self._plan(len(payloads))):
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

    def _decoded(self, payloads: Sequence[Payload]) -> Iterator[Decoded | DeviceCrop]:
        """Crops in input order. With a device decoder: every header is read in the pool, every payload the
        decoder will not take is queued to the pool at once, the JPEGs are decoded slice by slice on the device
        decode thread meanwhile, and any it routes back join the pool's queue when their slice comes back."""
        if self.device_decoder is None:
            yield from self.preprocessor.map(payloads)
            return
        headers = self.preprocessor.call_each(self.device_decoder.inspect, payloads)
        on_cpu = self.preprocessor.map([p for p, header in zip(payloads, headers, strict=True) if header is None])
        eligible = [i for i, header in enumerate(headers) if header is not None]
        size = self._plan(len(payloads))[0] if eligible else 1
        parts = [eligible[start: start + size] for start in range(0, len(eligible), size)]
        slices = [self._submit_slice([payloads[i] for i in part], [headers[i] for i in part]) for part in parts]
        pending = iter(zip(parts, slices, strict=True))
        device_crops: dict[int, DeviceCrop] = {}
        routed: dict[int, Iterator[Decoded]] = {}
        try:
            for position, header in enumerate(headers):
                if header is None:
                    yield next(on_cpu)
                    continue
                while position not in device_crops and position not in routed:
                    part, future = next(pending)
                    decoded = future.result()
                    back = [i for i, crop in zip(part, decoded.crops, strict=True) if crop is None]
                    again = self.preprocessor.map([payloads[i] for i in back])
                    routed.update((i, again) for i in back)  # one iterator, read in position order
                    device_crops.update((i, DeviceCrop(crop, decoded.ready))
                                        for i, crop in zip(part, decoded.crops, strict=True) if crop is not None)
                yield device_crops.pop(position) if position in device_crops else next(routed.pop(position))
        finally:
            for future in slices:
                future.cancel()  # slices not started yet, when a failure ends the request early

    def _submit_slice(self, payloads: list[Payload], headers: list[JpegHeader | None]) -> Future[DecodedSlice]:
        if self._device_decode_thread is None:
            self._device_decode_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-decode")
        return self._device_decode_thread.submit(self._decode_slice, payloads, headers)

    def _decode_slice(self, payloads: list[Payload], headers: list[JpegHeader | None]) -> DecodedSlice:
        """On the device decode thread: the current device and inference mode are per thread, so set them here."""
        with self.runtime.scope(), torch.inference_mode():
            return self.device_decoder.decode_slice(payloads, headers)  # type: ignore[union-attr]

    def _plan(self, count: int) -> list[int]:
        return plan_chunks(count, self.buckets, self.config.max_batch, self.config.chunks_per_request)

    def _chunks(
        self, decoded: Iterable[Decoded | DeviceCrop], results: list, timings: Timings, plan: list[int]
    ) -> Iterator[_Chunk]:
        """Group good crops into chunks of the planned sizes; host crops are written into a staging buffer."""
        sizes = iter(plan)
        chunk = self._new_chunk(0, next(sizes, self.config.max_batch))
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
            elif isinstance(item, DeviceCrop):
                chunk.device_positions.append(position)
                chunk.device_crops.append(item)
            else:
                chunk.staging[len(chunk.host_positions)].numpy()[...] = item
                chunk.host_positions.append(position)
            if len(chunk) == chunk.capacity:
                yield chunk
                chunk = self._new_chunk(chunk.number + 1, next(sizes, self.config.max_batch))
            position += 1
        if len(chunk):
            yield chunk

    def _new_chunk(self, number: int, capacity: int) -> _Chunk:
        index, staging = self.staging.take()  # waits until the copy that last read this buffer completed
        return _Chunk(number=number, capacity=capacity, staging_index=index, staging=staging)

    def _launch(self, chunk: _Chunk, request: Request) -> PendingHost:
        outputs = self._forward(self._assemble(chunk), len(chunk), request)
        return self.runtime.to_host(outputs, f"results[{chunk.number}]")

    def _assemble(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk as one uint8 NHWC batch on the device, padded to its bucket: one stack of the device
        crops (once this stream has waited for the decoder's), one non_blocking copy of the host crops, no
        per-row copies and no pageable transfers."""
        count, on_device = len(chunk), len(chunk.device_crops)
        bucket = bucket_for(count, self.buckets)
        host = chunk.staging[: len(chunk.host_positions)]
        placement = self.runtime.placement
        if not chunk.device_crops and bucket == count:
            batch = host.to(placement, non_blocking=True)
        else:
            batch = torch.empty((bucket, *chunk.staging.shape[1:]), dtype=torch.uint8, device=placement)
            if chunk.device_crops:
                crops = [item.crop for item in chunk.device_crops]
                for ready in {id(item.ready): item.ready for item in chunk.device_crops}.values():
                    ready.order_before_current()
                self.runtime.keep_for_current_stream(crops)
                torch.stack(crops, out=batch[:on_device])
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
        if self._device_decode_thread is not None:
            self._device_decode_thread.shutdown(wait=True, cancel_futures=True)
            self._device_decode_thread = None
        self.preprocessor.close()
