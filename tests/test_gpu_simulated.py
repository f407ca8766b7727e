"""The CUDA code paths on a simulated multi-GPU machine (tests/harness/simulated_device.py): which device every CUDA
object is made and used on, where the host waits and how, what a failure costs, and how the pipeline overlaps.

Unverified on a real GPU until bench/gpu_check.py has run on one; these check the handler's own logic.
"""

import io
import logging
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image

from handler.codecs import ImageError
from handler.device import DeviceRuntime, StagingBuffers
from handler.device_decode import DeviceJpegDecoder, JpegBackend, torchvision_backend
from handler.engine import InferenceEngine
from handler.preprocess import Preprocessor, transform_spec
from tests.harness.simulated_device import SimulatedCuda, SimulatedCudaRuntime, TimedModel, out_of_memory

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec.*:DeprecationWarning")

TINY = {"resize_size": 32, "crop_size": 32}
DEVICE_OPS = ("event.record", "event.synchronize", "stream.create", "stream.wait_event", "stream.wait_stream",
              "stream.synchronize", "device.synchronize", "launch", "set_device")


@pytest.fixture
def cuda(monkeypatch):
    """Two simulated GPUs; device 0 is current, as in a TorchServe worker that was given gpu_id 1."""
    cudnn = torch.backends.cudnn.benchmark
    yield SimulatedCuda(devices=2, current=0).install(monkeypatch)
    torch.backends.cudnn.benchmark = cudnn


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 1000)).eval()


def jpeg(colour, size=(64, 48), **options) -> bytes:
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "PNG")
    return buffer.getvalue()


def mixed_payloads(count: int) -> list[bytes]:
    """Baseline JPEGs for the device, with a PNG and a progressive JPEG (the CPU path) every 4 images."""
    payloads = []
    for i in range(count):
        colour = (30 * i % 256, 255 - 20 * i % 256, 90)
        payloads.append(png(colour) if i % 4 == 1 else jpeg(colour, progressive=i % 4 == 3))
    return payloads


def cuda_engine(cuda, model, index=1, backend=None, **overrides):
    """An engine on simulated ``cuda:index`` with the device JPEG decoder; tensors live on the CPU."""
    config = make_config(device="cuda", **{**TINY, **overrides})
    runtime = SimulatedCudaRuntime(cuda, index, config.pin_memory)
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cuda", index),
                                backend=backend or torchvision_backend(), runtime=runtime)
    return InferenceEngine(config, model, torch.device("cuda", index), device_decoder=decoder, runtime=runtime)


def assert_same_top1(results, expected):
    assert [r.status if isinstance(r, ImageError) else r[0][0] for r in results] == [
        e.status if isinstance(e, ImageError) else e[0][0] for e in expected]


# --- 1. Every CUDA object on the engine's own device -------------------------------------------------------------


def test_fences_of_a_runtime_on_device_1_are_recorded_on_device_1_while_device_0_is_current(cuda):
    runtime = DeviceRuntime(torch.device("cuda", 1), pin_memory=False)
    cuda.set_device(0)  # whatever made device 0 current again (another library, another engine)
    staging = StagingBuffers(runtime, 2, (2, 4, 4, 3))
    index, _ = staging.take()
    staging.sent(index)
    runtime.to_host({"logits": torch.zeros(2, 3)}, "results[0]").lists()
    recorded = cuda.ops("event.record")
    assert len(recorded) == 2 and {op.device for op in recorded} == {1}, recorded


def test_an_engine_on_device_1_makes_and_uses_every_cuda_object_there(cuda):
    model = tiny_classifier()
    engine = cuda_engine(cuda, model, index=1, max_batch=4)
    assert cuda.current_device() == 1  # set at start-up: pinned memory, cuDNN and nvJPEG handles follow it
    cuda.set_device(0)  # and guarded per call even if something else changes it
    cuda.log.clear()
    payloads = mixed_payloads(10)
    results = engine.predict(payloads)
    reference = InferenceEngine(make_config(max_batch=4, **TINY), model, torch.device("cpu"))
    assert_same_top1(results, reference.predict(payloads))
    on_a_device = [op for op in cuda.log if op.kind in DEVICE_OPS and op.device is not None]  # None: never recorded
    assert {op.device for op in on_a_device} == {1}, [op for op in on_a_device if op.device != 1]
    assert {op.current for op in cuda.log} == {1}  # in every thread, the device decode thread included
    assert {op.thread.split("_")[0] for op in cuda.log} >= {"MainThread", "device-decode"}
    assert cuda.current_device() == 0  # the caller's current device is left as it was
    engine.close()
    reference.close()


def test_pinned_host_memory_is_allocated_with_the_engines_device_current(cuda):
    engine = cuda_engine(cuda, tiny_classifier(), index=1, max_batch=4)
    cuda.set_device(0)
    engine.predict(mixed_payloads(6))
    allocations = cuda.ops("host_alloc")
    assert allocations and all(op.current == 1 and op.detail["pinned"] for op in allocations)
    engine.close()


# --- 2. Out of memory in the decoder's check or in the hand-over -------------------------------------------------


def test_out_of_memory_in_the_decoders_plausibility_check_routes_the_slice_to_the_cpu(monkeypatch):
    real_aminmax, calls = torch.aminmax, []

    def aminmax_out_of_memory_once(image):
        calls.append(1)
        if len(calls) == 1:
            raise out_of_memory()
        return real_aminmax(image)

    monkeypatch.setattr(torch, "aminmax", aminmax_out_of_memory_once)
    config = make_config(max_batch=4, **TINY)
    model = tiny_classifier()
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"), backend=torchvision_backend())
    engine = InferenceEngine(config, model, torch.device("cpu"), device_decoder=decoder)
    reference = InferenceEngine(config, model, torch.device("cpu"))
    payloads = mixed_payloads(12)  # 6 JPEGs for the device: slices of 4 and 2
    results = engine.predict(payloads)
    assert len(calls) > 1  # the next slice was decoded on the device again
    assert not any(isinstance(result, ImageError) for result in results)
    assert_same_top1(results, reference.predict(payloads))
    engine.close()
    reference.close()


def test_out_of_memory_while_handing_crops_over_costs_only_that_chunk(cuda):
    engine = cuda_engine(cuda, tiny_classifier(), max_batch=4, chunks_per_request=1)
    payloads = [jpeg((20 * i, 100, 200 - 20 * i)) for i in range(8)]  # chunks of 4 device crops each
    cuda.failures["stream.wait_event"] = out_of_memory()  # the first hand-over to the model's stream
    results = engine.predict(payloads)
    assert [isinstance(result, ImageError) and result.status == 500 for result in results] == [True] * 4 + [False] * 4
    assert not cuda.ops("probe")  # out of memory: contained without asking the device
    engine.close()


# --- 3. and 4. The pipeline: decode off the main thread, overlap, small padding, the pool fed at once -----------


class RecordingBackend:
    """torchvision's decoder, recording the thread and time of every call."""

    def __init__(self, cuda=None, device_seconds_per_image=0.0, host_seconds_per_image=0.0):
        self.cuda, self.device_seconds, self.host_seconds = cuda, device_seconds_per_image, host_seconds_per_image
        self.calls = []

    def backend(self) -> JpegBackend:
        return JpegBackend("recording", self.decode_batch, upright=False)

    def decode_batch(self, data, device):
        started = time.perf_counter()
        if self.cuda is not None and self.device_seconds:
            self.cuda.launch(self.device_seconds * len(data), f"nvjpeg[{len(data)}]")
        time.sleep(self.host_seconds * len(data))  # the host side of the call (Huffman decode, launches)
        decoded = torchvision_backend().decode_batch(data, device)
        self.calls.append((threading.current_thread().name, len(data), started, time.perf_counter()))
        return decoded


def cpu_engine_with_device_decoder(model, backend, **overrides):
    """The engine's device-decode wiring with the decoder on the CPU (no simulated CUDA needed)."""
    config = make_config(**{**TINY, **overrides})
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"), backend=backend)
    return InferenceEngine(config, model, torch.device("cpu"), device_decoder=decoder)


def test_device_decode_runs_off_the_main_thread():
    recording = RecordingBackend()
    engine = cpu_engine_with_device_decoder(tiny_classifier(), recording.backend(), max_batch=4)
    engine.predict(mixed_payloads(12))
    assert recording.calls and all(thread.startswith("device-decode") for thread, *_ in recording.calls)
    engine.close()


def test_a_request_of_max_batch_images_overlaps_decode_and_model(cuda):
    recording = RecordingBackend(cuda, device_seconds_per_image=0.004, host_seconds_per_image=0.002)
    model = TimedModel(tiny_classifier(), cuda, base=0.002, per_image=0.001)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append((args[0].shape[0], time.perf_counter())))
    engine = cuda_engine(cuda, model, backend=recording.backend(), max_batch=32)
    payloads = [jpeg((7 * i, 100, 250 - 7 * i)) for i in range(32)]
    results = engine.predict(payloads)
    assert not any(isinstance(result, ImageError) for result in results)
    assert [size for size, _ in forwards] == [16, 16]  # cut into chunks, so that ...
    assert forwards[0][1] < recording.calls[-1][3]  # ... the model starts before the last slice is decoded
    engine.close()


def test_nine_images_are_not_padded_to_a_larger_bucket():
    model = tiny_classifier()
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[0]))
    engine = cpu_engine_with_device_decoder(model, torchvision_backend(), max_batch=32,
                                            batch_buckets=(1, 2, 4, 8, 16, 32))
    engine.predict([jpeg((20 * i, 50, 90)) for i in range(9)])
    assert sum(shapes) == 9  # 4 + 4 + 1: no padding at all (it was one forward of 16, 7 of them padding)
    engine.close()


def test_the_default_cuda_buckets_are_fine(cuda):
    assert cuda_engine(cuda, tiny_classifier(), max_batch=32).buckets == (1, 2, 4, 8, 16, 32)


def test_every_cpu_path_image_is_queued_to_the_pool_before_the_device_decodes(monkeypatch):
    queued = []
    real_map = Preprocessor.map
    monkeypatch.setattr(Preprocessor, "map", lambda self, payloads: queued.append(len(payloads)) or real_map(
        self, payloads))
    recording = RecordingBackend()
    engine = cpu_engine_with_device_decoder(tiny_classifier(), recording.backend(), max_batch=4)
    payloads = mixed_payloads(16)  # 8 for the CPU path, spread over the 4 slices of 4
    engine.predict(payloads)
    assert queued[0] == 8  # all of them at once, not one slice's share at a time
    assert [size for _, size, *_ in recording.calls] == [4, 4]
    engine.close()


# --- 5. Host waits sleep instead of spinning ---------------------------------------------------------------------


def test_runtime_fences_are_blocking_events(cuda):
    runtime = DeviceRuntime(torch.device("cuda", 0), pin_memory=False)
    runtime.fence("results[0]").record()
    created = cuda.ops("event.create")
    assert len(created) == 1 and created[0].detail["blocking"] is True


def test_every_host_wait_is_on_a_blocking_event_never_a_spinning_sync(cuda):
    engine = cuda_engine(cuda, tiny_classifier(), max_batch=4)
    cuda.log.clear()
    engine.predict(mixed_payloads(12))
    created = cuda.ops("event.create")
    assert created and all(op.detail["blocking"] for op in created)
    assert cuda.ops("event.synchronize")
    assert not cuda.ops("stream.synchronize", "device.synchronize")
    engine.close()


# --- 6. pin_memory: false on CUDA is said ----------------------------------------------------------------------


def test_pin_memory_off_on_cuda_is_warned_about(cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="handler.device"):
        DeviceRuntime(torch.device("cuda", 1), pin_memory=False)
    assert "pin_memory is false on cuda:1" in caplog.text
    assert "Set pin_memory: true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="handler.device"):
        DeviceRuntime(torch.device("cuda", 1), pin_memory=True)
        DeviceRuntime(torch.device("cpu"), pin_memory=False)
    assert caplog.text == ""


# --- 7. cuDNN autotuning only with a warm-up ---------------------------------------------------------------------


def test_cudnn_autotuning_is_switched_on_by_the_warm_up_only(cuda):
    torch.backends.cudnn.benchmark = False
    engine = cuda_engine(cuda, tiny_classifier(), max_batch=4)
    engine.predict(mixed_payloads(3))
    assert torch.backends.cudnn.benchmark is False  # no warm-up: the first request per shape must not autotune
    assert engine.warm_up() == [1, 2, 4]
    assert torch.backends.cudnn.benchmark is True
    engine.close()
