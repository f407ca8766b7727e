"""The engine without a server: batching, strategies, ordering, errors, buckets, and the ordering of its device
work (fences logged in order by a simulated device), sticky-error handling, compile with static shapes."""

import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
import torch
from conftest import DEMO_PREPROCESSING, make_config
from PIL import Image
from torch._dynamo.utils import counters

from handler import device_decode, imaging, preprocess
from handler import engine as engine_module
from handler.backends import inductor_step
from handler.codecs import ImageError
from handler.config import ConfigError
from handler.device import DeviceLost
from handler.device_decode import DeviceJpegDecoder, JpegBackend, torchvision_backend
from handler.engine import InferenceEngine, bucket_for, device_decoder_for, plan_chunks, resolve_buckets
from handler.preprocess import Preprocessor, transform_spec
from tests.harness.reference import reference_probabilities, timm_transform
from tests.harness.simulated_device import RecordingFence, SimulatedCuda, SimulatedRuntime, out_of_memory, sticky_error


def engine_for(model, **overrides):
    return InferenceEngine(make_config(**overrides), model, torch.device("cpu"))


def assert_same_predictions(left, right, tolerance=1e-4):
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        if isinstance(a, ImageError) or isinstance(b, ImageError):
            assert a == b
            continue
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=tolerance)


def top5_shifts(ours, reference):
    """Per image: |our score - the reference's| for each of the reference's top-5 classes, worst of the five."""
    shifts = []
    for result, probabilities in zip(ours, reference, strict=True):
        scores = dict(result)
        shifts.append(max(abs(scores[int(i)] - float(probabilities[i])) for i in probabilities.topk(5).indices))
    return shifts


@pytest.mark.parametrize(("photo_set", "count", "same_top5", "max_shift"), [
    ("imagenet", 24, True, 0.005),  # 500x375: full decode; measured max 0.0019 (a level here and there)
    ("mixed", 12, True, 0.005),     # every mode and format; measured 0.0003
    ("phone", 6, False, 0.05),      # 12 MP decoded at 1/4 DCT scale; measured 0.041, top-1 always kept
])
def test_trained_model_matches_timms_own_eval_pipeline(demo_model, corpus, photo_set, count, same_top5, max_shift):
    """Full decode + timm.data.create_transform of the model's config, on the same trained weights."""
    photos = [path.read_bytes() for path in sorted((corpus / photo_set).iterdir()) if path.is_file()][:count]
    engine = engine_for(demo_model, **DEMO_PREPROCESSING)
    ours = engine.predict(photos, topk=1000)
    engine.close()
    reference = reference_probabilities(demo_model, photos, timm_transform(demo_model))
    shifts = top5_shifts(ours, reference)
    print(f"\n{photo_set}: max top-5 score shift {max(shifts):.4f}, median {sorted(shifts)[len(shifts) // 2]:.5f}")
    assert [result[0][0] for result in ours] == reference.argmax(dim=1).tolist()
    if same_top5:
        assert [[i for i, _ in result[:5]] for result in ours] == reference.topk(5, dim=1).indices.tolist()
    assert max(shifts) <= max_shift


def test_batched_equals_one_by_one(small_model, imagenet_photos):
    photos = imagenet_photos[:10]
    engine = engine_for(small_model)
    batched = engine.predict(photos)
    alone = [engine.predict([photo])[0] for photo in photos]
    assert_same_predictions(batched, alone)
    engine.close()


def test_requests_larger_than_max_batch_are_chunked_in_order(small_model, imagenet_photos):
    photos = imagenet_photos[:19]
    chunked = engine_for(small_model, max_batch=4)
    whole = engine_for(small_model, max_batch=32)
    assert_same_predictions(chunked.predict(photos), whole.predict(photos))
    chunked.close()
    whole.close()


@pytest.mark.parametrize("strategy", ["dataloader", "inline"])
def test_every_strategy_produces_the_same_crops(strategy, imagenet_photos, mixed_images):
    payloads = imagenet_photos[:5] + list(mixed_images.values()) + [b"not an image"]
    threads = Preprocessor(make_config(decode_strategy="threads"))
    other = Preprocessor(make_config(decode_strategy=strategy, dataloader_workers=2, dataloader_batch_size=4))
    for ours, theirs in zip(threads.map(payloads), other.map(payloads), strict=True):
        if isinstance(ours, ImageError):
            assert ours == theirs
        else:
            np.testing.assert_array_equal(ours, theirs)
    threads.close()
    other.close()


def test_bad_images_keep_their_place_and_do_not_disturb_the_others(small_model, imagenet_photos):
    good = imagenet_photos[:3]
    engine = engine_for(small_model, max_batch=2)
    mixed = [good[0], b"garbage", good[1], ImageError(413, "too big"), good[2], good[0][:100]]
    results = engine.predict(mixed)
    assert isinstance(results[1], ImageError) and results[1].status == 415
    assert results[3] == ImageError(413, "too big")
    assert isinstance(results[5], ImageError) and results[5].status == 400
    assert engine.last_timings.rejected == {415: 1, 413: 1, 400: 1}
    assert_same_predictions([results[0], results[2], results[4]], engine.predict(good))
    engine.close()


def test_all_bad_batch_gives_only_errors(small_model):
    engine = engine_for(small_model)
    results = engine.predict([b"x", b"y"])
    assert all(isinstance(r, ImageError) for r in results)
    engine.close()


def test_inputs_are_not_mutated(small_model, imagenet_photos):
    engine = engine_for(small_model)
    payloads = [bytearray(photo) for photo in imagenet_photos[:3]]  # mutable, as TorchServe hands them over
    engine.predict(payloads)
    assert payloads == [bytearray(photo) for photo in imagenet_photos[:3]]
    batch = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    before = batch.clone()
    engine.normalize(batch)
    assert torch.equal(batch, before)
    engine.close()


@pytest.mark.parametrize(("mean", "std"), [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ((0.1, 0.5, 0.9), (0.3, 0.2, 0.1)),
])
def test_normalize_is_channels_last_and_matches_float_math(small_model, mean, std):
    engine = engine_for(small_model, mean=mean, std=std)
    batch = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    images = engine.normalize(batch)
    assert images.shape == (2, 3, 224, 224)
    assert images.is_contiguous(memory_format=torch.channels_last)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    engine.close()


def test_buckets():
    config = make_config(max_batch=64)
    assert resolve_buckets(config, torch.device("cpu")) == ()
    assert resolve_buckets(config, torch.device("cpu"), static_shapes=True) == (1, 8, 32, 64)
    assert resolve_buckets(make_config(max_batch=16), torch.device("cpu"), static_shapes=True) == (1, 8, 16)
    assert resolve_buckets(config, torch.device("cuda", 0)) == (1, 2, 4, 8, 16, 32, 64)
    assert resolve_buckets(make_config(max_batch=8), torch.device("cuda", 0)) == (1, 2, 4, 8)
    assert resolve_buckets(make_config(max_batch=12), torch.device("cuda", 0)) == (1, 2, 4, 8, 12)
    assert resolve_buckets(make_config(max_batch=8, batch_buckets=(2, 8)), torch.device("cpu")) == (2, 8)
    assert [bucket_for(n, (1, 8, 32)) for n in (1, 2, 8, 9, 32)] == [1, 8, 8, 32, 32]
    assert bucket_for(5, ()) == 5


@pytest.mark.parametrize(("count", "buckets", "max_batch", "chunks", "plan"), [
    (9, (1, 8, 32), 32, 1, [8, 1]),              # was one chunk padded to 32: 23 images of padding
    (9, (1, 2, 4, 8, 16, 32), 32, 2, [4, 4, 1]),  # no padding, and the model starts after 4 images
    (32, (1, 2, 4, 8, 16, 32), 32, 2, [16, 16]),  # a request of max_batch images overlaps too
    (32, (1, 2, 4, 8, 16, 32), 32, 1, [32]),
    (20, (1, 2, 4, 8, 16, 32), 32, 1, [16, 4]),
    (12, (1, 8), 8, 1, [8, 4]),                   # 4 padded to 8 beats 4 launches of 1
    (3, (1, 2, 4, 8, 16, 32), 32, 2, [3]),        # too few images to split: 1 padded row is cheaper
    (70, (1, 2, 4, 8, 16, 32), 32, 2, [32, 32, 6]),  # 6 padded to 8 costs what 4 + 2 do: the larger wins
    (10, (), 4, 2, [4, 4, 2]),                    # no buckets (CPU): max_batch at a time, as before
])
def test_requests_are_cut_into_bucket_sized_chunks(count, buckets, max_batch, chunks, plan):
    assert plan_chunks(count, buckets, max_batch, chunks) == plan
    padding = sum(bucket_for(size, buckets) - size for size in plan)
    assert padding <= max(plan)  # never more padding than one chunk
    assert plan_chunks(0, buckets, max_batch, chunks) == []


def test_padding_to_a_bucket_does_not_change_results(small_model, imagenet_photos):
    photos = imagenet_photos[:3]
    padded = engine_for(small_model, batch_buckets=(1, 8))
    unpadded = engine_for(small_model)
    assert_same_predictions(padded.predict(photos), unpadded.predict(photos))
    assert padded.warm_up() == [1, 8]
    padded.close()
    unpadded.close()


def test_pool_is_created_once_and_reused_by_every_request(small_model, imagenet_photos, monkeypatch):
    created = []
    real_pool = preprocess.ThreadPoolExecutor

    def counting_pool(*args, **kwargs):
        created.append(kwargs)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(preprocess, "ThreadPoolExecutor", counting_pool)
    engine = engine_for(small_model, decode_threads=3)
    engine.predict(imagenet_photos[:2])
    engine.predict(imagenet_photos[2:4])
    assert created == [{"max_workers": 3, "thread_name_prefix": "decode"}]
    engine.close()


def test_device_decoder_path_matches_the_pool_path_and_routes_the_rest(small_model, imagenet_photos, mixed_images):
    """The engine's GPU decode wiring, run with the decoder on the CPU (no GPU here)."""
    payloads = [imagenet_photos[0], mixed_images["photo.png"], b"broken", imagenet_photos[1],
                mixed_images["cmyk.jpg"], imagenet_photos[2]]
    config = make_config(max_batch=4)
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"))
    with_decoder = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=decoder)
    pool_only = engine_for(small_model, max_batch=4)
    ours, expected = with_decoder.predict(payloads), pool_only.predict(payloads)
    assert isinstance(ours[2], ImageError) and ours[2] == expected[2]
    assert_same_predictions([r for r in ours if not isinstance(r, ImageError)],
                            [r for r in expected if not isinstance(r, ImageError)], tolerance=5e-3)
    with_decoder.close()
    pool_only.close()


def test_an_image_the_device_decoder_gives_back_is_classified_through_the_pool_in_its_place(small_model,
                                                                                            imagenet_photos):
    """The device decoder read the header but its output is blank (a skipped image): that image, and only
    that one, is decoded again by the pool and keeps its own place."""
    real = torchvision_backend()

    def blanks_the_second(data, device):
        decoded = real.decode_batch(data, device)
        return [decoded[0], torch.zeros_like(decoded[1]), *decoded[2:]]

    payloads = imagenet_photos[:4]
    config = make_config(max_batch=4)
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"),
                                backend=JpegBackend("blanks", blanks_the_second, upright=False))
    with_decoder = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=decoder)
    pool_only = engine_for(small_model, max_batch=4)
    ours, expected = with_decoder.predict(payloads), pool_only.predict(payloads)
    assert [i for i, _ in expected[0]] != [i for i, _ in expected[1]]  # the images are told apart
    assert_same_predictions(ours, expected, tolerance=5e-3)
    with_decoder.close()
    pool_only.close()


def test_a_request_topk_overrides_the_configured_one(small_model, imagenet_photos):
    engine = engine_for(small_model)
    assert [len(result) for result in engine.predict(imagenet_photos[:2], topk=3)] == [3, 3]
    assert [len(result) for result in engine.predict(imagenet_photos[:2])] == [engine.config.topk] * 2 != [3, 3]
    engine.close()


def test_device_decode_is_automatic_only_on_cuda(monkeypatch):
    SimulatedCuda().install(monkeypatch)
    assert device_decoder_for(make_config(), torch.device("cpu")) is None
    assert device_decoder_for(make_config(decode_device="cpu"), torch.device("cuda", 0)) is None
    assert isinstance(device_decoder_for(make_config(), torch.device("cuda", 0)), DeviceJpegDecoder)
    with pytest.raises(ConfigError, match="needs the model on CUDA"):
        device_decoder_for(make_config(decode_device="cuda"), torch.device("cpu"))


def recorded_input_shapes(model):
    shapes = []
    handle = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_requests_only_reuse_shapes_seen_at_warm_up(small_model, imagenet_photos):
    """With buckets, cudnn.benchmark never meets a new shape after start-up (so it never re-tunes)."""
    engine = engine_for(small_model, max_batch=8, batch_buckets=(1, 4, 8))
    shapes, handle = recorded_input_shapes(small_model)
    engine.warm_up()
    warmed = set(shapes)
    shapes.clear()
    for count in (1, 2, 3, 5, 8, 11, 19):
        engine.predict(imagenet_photos[:count])
    handle.remove()
    assert warmed == {(1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224)}
    assert set(shapes) <= warmed
    engine.close()


def test_cpu_warm_up_covers_small_batches_and_max_batch(small_model):
    engine = engine_for(small_model, max_batch=16)
    shapes, handle = recorded_input_shapes(small_model)
    assert engine.warm_up() == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    handle.remove()
    assert sorted({shape[0] for shape in shapes}) == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    engine.close()


def test_the_pool_decodes_as_many_images_at_once_as_it_has_threads(imagenet_photos, monkeypatch):
    """The point of the pool: with 3 threads, 3 images are decoded at the same time, and order is kept."""
    lock, running, peak = threading.Lock(), [0], [0]
    real_decode = preprocess.decode_and_transform

    def decode_and_count(payload, spec):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)  # long enough for the other threads to start theirs
            return real_decode(payload, spec)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(preprocess, "decode_and_transform", decode_and_count)
    photos = imagenet_photos[:9]
    pooled = Preprocessor(make_config(decode_threads=3))
    crops = list(pooled.map(photos))
    pooled.close()
    assert peak[0] == 3
    inline = Preprocessor(make_config(decode_strategy="inline"))
    for crop, expected in zip(crops, inline.map(photos), strict=True):
        np.testing.assert_array_equal(crop, expected)


# --- Ordering of device work, checked with fences that log in order (tests/harness/simulated_device.py) -------------


class LoggingPreprocessor(Preprocessor):
    """The real pool, logging ("crop", i) as crop i reaches the engine (which writes it into staging at once)."""

    def __init__(self, config, log):
        super().__init__(config)
        self.log = log

    def map(self, payloads):
        for index, item in enumerate(super().map(payloads)):
            self.log.append(("crop", index))
            yield item


def logged_engine(model, log, **overrides):
    config = make_config(**overrides)
    return InferenceEngine(config, model, torch.device("cpu"), preprocessor=LoggingPreprocessor(config, log),
                           runtime=SimulatedRuntime(log))


def test_a_staging_buffer_is_rewritten_only_after_the_copy_that_read_it_completed(small_model, imagenet_photos):
    log = []
    engine = logged_engine(small_model, log, max_batch=2)  # chunks: crops 0-1 in buffer 0, 2-3 in 1, 4-5 in 0
    engine.predict(imagenet_photos[:6])
    reused_at = log.index(("crop", 4))
    sent_at = max(i for i, entry in enumerate(log[:reused_at]) if entry == ("record", "staging[0]"))
    assert ("wait", "staging[0]") in log[sent_at:reused_at]
    engine.close()


def test_results_are_read_by_waiting_on_their_own_chunk_not_on_the_next(small_model, imagenet_photos):
    log = []
    engine = logged_engine(small_model, log, max_batch=2)
    small_model_hook = small_model.register_forward_pre_hook(lambda module, args: log.append(("forward",)))
    results = engine.predict(imagenet_photos[:6])
    small_model_hook.remove()
    forwards = [i for i, entry in enumerate(log) if entry == ("forward",)]
    for chunk in (0, 1):
        recorded, waited = log.index(("record", f"results[{chunk}]")), log.index(("wait", f"results[{chunk}]"))
        assert recorded < forwards[chunk + 1] < waited  # chunk k+1 was launched first; its fence came later
    assert all(isinstance(result, list) and len(result) == 5 for result in results)
    engine.close()


def test_a_sticky_device_error_raises_device_lost(small_model, imagenet_photos):
    def faulting_model(images):
        raise sticky_error()

    engine = InferenceEngine(make_config(), faulting_model, torch.device("cpu"), runtime=SimulatedRuntime(lost=True))
    with pytest.raises(DeviceLost):
        engine.predict(imagenet_photos[:3])
    engine.close()


class FailsOnItsSecondWait(RecordingFence):
    def wait(self):
        super().wait()
        if self.log.count(("wait", self.name)) == 2:
            raise sticky_error()


class ErrorSurfacingAtAStagingWait(SimulatedRuntime):
    """A sticky error reported by the next CUDA call, here the event wait before staging buffer 0 is reused."""

    def fence(self, name):
        return FailsOnItsSecondWait(name, self.log) if name == "staging[0]" else super().fence(name)


@pytest.mark.parametrize("lost", [True, False])
def test_an_error_outside_the_model_steps_is_judged_too(small_model, imagenet_photos, lost):
    runtime = ErrorSurfacingAtAStagingWait(lost=lost)
    engine = InferenceEngine(make_config(max_batch=2), small_model, torch.device("cpu"), runtime=runtime)
    with pytest.raises(DeviceLost if lost else RuntimeError) as raised:
        engine.predict(imagenet_photos[:6])
    assert isinstance(raised.value, DeviceLost) == lost  # not lost: the handler answers 500, the worker lives
    engine.close()


@pytest.mark.parametrize(("error", "lost", "probed"), [(out_of_memory, True, False), (sticky_error, False, True)])
def test_failures_the_device_survives_cost_only_their_chunk(small_model, imagenet_photos, error, lost, probed,
                                                           caplog):
    """Out of memory is contained without asking the device; anything else only if the device still works."""
    calls = []

    def fails_on_the_second_chunk(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise error()
        return small_model(images)

    runtime = SimulatedRuntime(lost=lost)
    engine = InferenceEngine(make_config(max_batch=2), fails_on_the_second_chunk, torch.device("cpu"),
                             runtime=runtime)
    results = engine.predict(imagenet_photos[:5])
    assert [isinstance(result, ImageError) and result.status == 500 for result in results] == [
        False, False, True, True, False]
    assert (("probe",) in runtime.log) == probed
    assert "inference failed for a chunk of 2 images" in caplog.text  # the cause is in the server log
    assert {result.message for result in results[2:4]} == {"inference failed for this image; see the server log"}
    engine.close()


def test_a_chunk_lays_out_device_crops_first_then_host_crops(small_model, imagenet_photos, mixed_images):
    """One stack of device crops, one copy of host crops; the rows map back to the right inputs."""
    payloads = [mixed_images["photo.png"], imagenet_photos[0], mixed_images["photo.webp"], imagenet_photos[1]]
    config = make_config(max_batch=4, batch_buckets=(8,))
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"))
    engine = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=decoder)
    inputs = []
    hook = small_model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    results = engine.predict(payloads)
    hook.remove()
    device_crops = decoder.decode([imagenet_photos[0], imagenet_photos[1]])
    cpu_path = Preprocessor(config)
    host_crops = [torch.from_numpy(np.array(crop)) for crop in cpu_path.map([payloads[0], payloads[2]])]
    cpu_path.close()
    expected = engine.normalize(torch.stack([*device_crops, *host_crops, *[torch.zeros_like(host_crops[0])] * 4]))
    torch.testing.assert_close(inputs[0], expected)
    pool_only = engine_for(small_model, max_batch=4)
    assert_same_predictions(results, pool_only.predict(payloads), tolerance=5e-3)
    engine.close()
    pool_only.close()


def test_device_path_reads_headers_in_the_decode_pool(small_model, imagenet_photos, monkeypatch):
    threads = []
    real = device_decode.read_header
    monkeypatch.setattr(device_decode, "read_header",
                        lambda payload, spec: threads.append(threading.current_thread().name) or real(payload, spec))
    config = make_config(max_batch=4)
    engine = InferenceEngine(config, small_model, torch.device("cpu"),
                             device_decoder=DeviceJpegDecoder(transform_spec(config), torch.device("cpu")))
    engine.predict(imagenet_photos[:6])
    assert len(threads) == 6 and all(name.startswith("decode") for name in threads)
    engine.close()


def test_progressive_jpegs_are_classified_through_the_cpu_path(small_model, imagenet_photos):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(imagenet_photos[0])).save(buffer, "JPEG", quality=90, progressive=True)
    payloads = [buffer.getvalue(), imagenet_photos[1]]
    config = make_config(max_batch=4)
    decoded = []

    def recording(data, device):
        decoded.append(len(data))
        return torchvision_backend().decode_batch(data, device)

    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"), JpegBackend("recording", recording, False))
    engine = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=decoder)
    pool_only = engine_for(small_model, max_batch=4)
    assert_same_predictions(engine.predict(payloads), pool_only.predict(payloads), tolerance=5e-3)
    assert decoded == [1]  # only the baseline JPEG went to the device decoder
    engine.close()
    pool_only.close()


def test_warm_up_runs_the_device_decoder_per_bucket_and_drops_it_if_its_self_check_fails(small_model):
    config = make_config(max_batch=4, batch_buckets=(1, 4))
    sizes = []

    def recording(data, device):
        sizes.append(len(data))
        return torchvision_backend().decode_batch(data, device)

    good = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"), JpegBackend("recording", recording, False))
    engine = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=good)
    assert engine.warm_up() == [1, 4]
    assert sizes == [1, 4] and engine.device_decoder is good

    def swaps_channels(data, device):
        return [image.flip(0) for image in torchvision_backend().decode_batch(data, device)]

    bad = DeviceJpegDecoder(transform_spec(config), torch.device("cpu"), JpegBackend("bgr", swaps_channels, False))
    engine = InferenceEngine(config, small_model, torch.device("cpu"), device_decoder=bad)
    engine.warm_up()
    assert engine.device_decoder is None
    engine.close()


def test_a_compiled_model_gets_one_static_graph_per_bucket_and_requests_compile_nothing(imagenet_photos, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 1000)).eval()
    step = inductor_step(tiny, "fp32", tmp_path, channels_last=True)
    engine = InferenceEngine(make_config(max_batch=4, batch_buckets=(1, 4)), tiny, torch.device("cpu"), step=step)
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    assert engine.warm_up() == [1, 4]
    assert graphs() - before == 2 == step.graphs_built()
    for count in (1, 2, 3, 5):
        engine.predict(imagenet_photos[:count])
    assert graphs() - before == 2
    with torch.inference_mode():
        step(engine.normalize(torch.zeros((2, 224, 224, 3), dtype=torch.uint8)))  # as the engine calls it
    assert graphs() - before == 3  # an unseen size is a new static graph, not a recompile for dynamic shapes
    engine.close()


# --- The preprocessor: settings that reach the decoder, which strategy runs, shutdown ---------------------------


def png_of(colour, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def decoded_sizes_of(config, payload, monkeypatch) -> list[tuple[int, int]]:
    """The size each image had when decoded (before the crop), through a Preprocessor of ``config``."""
    sizes = []
    real_to_rgb = imaging.to_rgb
    monkeypatch.setattr(imaging, "to_rgb", lambda image: sizes.append(image.size) or real_to_rgb(image))
    preprocessor = Preprocessor(config)
    crops = list(preprocessor.map([payload]))
    preprocessor.close()
    assert crops[0].shape == (config.crop_size, config.crop_size, 3)
    return sizes


@pytest.mark.parametrize(("overrides", "size"), [
    ({}, (1008, 756)),                               # default margin 2: short side >= 512, so 1/4 of 4032x3024
    ({"draft_margin": 1.0}, (504, 378)),             # margin 1: short side >= 256, so 1/8
    ({"draft_margin": 3.0}, (2016, 1512)),           # margin 3: short side >= 768, so 1/2
    ({"reduced_jpeg_decode": False}, (4032, 3024)),  # full size
])
def test_jpeg_decode_settings_reach_the_decoder(phone_photos, monkeypatch, overrides, size):
    assert Image.open(io.BytesIO(phone_photos[0])).size == (4032, 3024)
    assert decoded_sizes_of(make_config(decode_strategy="inline", **overrides), phone_photos[0], monkeypatch) == [size]


@pytest.fixture
def decode_spy(monkeypatch):
    """Records the thread of every decode and the arguments of every DataLoader built."""
    threads, created = [], []
    real_decode = preprocess.decode_and_transform
    monkeypatch.setattr(preprocess, "decode_and_transform",
                        lambda payload, spec: threads.append(threading.current_thread().name) or real_decode(
                            payload, spec))

    class RecordingDataLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            created.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(preprocess, "DataLoader", RecordingDataLoader)
    return threads, created


@pytest.mark.parametrize(("strategy", "decode_thread", "loaders"), [
    ("threads", "decode", 0),
    ("inline", "MainThread", 0),
    ("dataloader", "MainThread", 1),  # with 0 workers the DataLoader runs in this process
])
def test_the_configured_strategy_is_the_one_that_runs(decode_spy, strategy, decode_thread, loaders):
    threads, created = decode_spy
    payloads = [png_of((255, 0, 0)), png_of((0, 255, 0)), png_of((0, 0, 255))]
    preprocessor = Preprocessor(make_config(decode_strategy=strategy, dataloader_workers=0, resize_size=32,
                                            crop_size=32))
    crops = list(preprocessor.map(payloads))
    preprocessor.close()
    assert len(threads) == 3 and all(name.startswith(decode_thread) for name in threads), threads
    assert len(created) == loaders
    assert [tuple(crop[16, 16]) for crop in crops] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_dataloader_with_no_workers_runs_in_this_process_in_batches_of_the_configured_size(monkeypatch):
    batches = []
    real_collate = preprocess._collate_crops
    monkeypatch.setattr(preprocess, "_collate_crops", lambda items: batches.append(len(items)) or real_collate(items))
    colours = [(i * 30, 255 - i * 30, 7) for i in range(7)]
    preprocessor = Preprocessor(make_config(decode_strategy="dataloader", dataloader_workers=0,
                                            dataloader_batch_size=3, resize_size=32, crop_size=32))
    crops = list(preprocessor.map([png_of(colour) for colour in colours]))
    preprocessor.close()
    assert batches == [3, 3, 1]
    assert [tuple(int(v) for v in crop[16, 16]) for crop in crops] == colours


def test_dataloader_gets_the_configured_workers_and_start_method(decode_spy, monkeypatch):
    """Only the arguments are checked: starting spawn workers would take seconds."""
    _, created = decode_spy

    def in_process_loader(*args, **kwargs):
        created.append(kwargs)
        return torch.utils.data.DataLoader(*args, **{**kwargs, "num_workers": 0, "multiprocessing_context": None})

    monkeypatch.setattr(preprocess, "DataLoader", in_process_loader)
    preprocessor = Preprocessor(make_config(decode_strategy="dataloader", dataloader_workers=3,
                                            dataloader_batch_size=5, dataloader_start_method="spawn",
                                            resize_size=32, crop_size=32))
    assert len(list(preprocessor.map([png_of((1, 2, 3))] * 2))) == 2
    preprocessor.close()
    assert len(created) == 1
    assert (created[0]["num_workers"], created[0]["batch_size"], created[0]["multiprocessing_context"]) == (
        3, 5, "spawn")
    assert created[0]["pin_memory"] is False  # no CUDA here: nothing to pin for


def test_a_dataloader_batch_of_only_bad_images_keeps_every_error_in_place():
    payloads = [png_of((9, 9, 9)), png_of((8, 8, 8)), b"not an image", b"\xff\xd8\xff truncated", b"?",
                png_of((7, 7, 7))]
    preprocessor = Preprocessor(make_config(decode_strategy="dataloader", dataloader_workers=0,
                                            dataloader_batch_size=2, resize_size=32, crop_size=32))
    results = list(preprocessor.map(payloads))  # batches: [good, good], [bad, bad], [bad, good]
    preprocessor.close()
    assert [type(r).__name__ for r in results] == ["ndarray", "ndarray", "ImageError", "ImageError", "ImageError",
                                                   "ndarray"]
    assert (results[2].status, results[3].status, results[4].status) == (415, 400, 415)
    assert [int(results[i][0, 0, 0]) for i in (0, 1, 5)] == [9, 8, 7]
    everything_bad = Preprocessor(make_config(decode_strategy="dataloader", dataloader_workers=0))
    assert [r.status for r in everything_bad.map([b"x", b"y", b"z"])] == [415, 415, 415]
    everything_bad.close()


def test_close_cancels_queued_decodes_and_waits_for_the_running_one(monkeypatch):
    started, release, closed = threading.Event(), threading.Event(), threading.Event()
    decoded, closed_while_decoding = [], []
    real_decode = preprocess.decode_and_transform

    def decode(payload, spec):
        if not decoded:
            started.set()
            assert release.wait(10)
            closed_while_decoding.append(closed.is_set())
        decoded.append(payload)
        return real_decode(payload, spec)

    futures = []

    class RecordingPool(preprocess.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            futures.append(super().submit(*args, **kwargs))
            return futures[-1]

    monkeypatch.setattr(preprocess, "decode_and_transform", decode)
    monkeypatch.setattr(preprocess, "ThreadPoolExecutor", RecordingPool)
    preprocessor = Preprocessor(make_config(decode_threads=1, resize_size=32, crop_size=32))
    payloads = [png_of((i, i, i)) for i in range(5)]
    preprocessor.map(payloads)
    assert started.wait(10)
    closer = threading.Thread(target=lambda: (preprocessor.close(), closed.set()))
    closer.start()
    try:  # the queued decodes are cancelled at once, while the first one still runs
        for future in futures[1:]:
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(timeout=5)
    finally:
        release.set()
        closer.join(10)
    assert decoded == payloads[:1]
    assert closed_while_decoding == [False]  # close() returned only after the running decode had finished
    assert futures[0].done() and not futures[0].cancelled()


def test_close_twice_is_harmless_and_a_later_map_still_decodes():
    preprocessor = Preprocessor(make_config(decode_threads=2, resize_size=32, crop_size=32))
    preprocessor.close()
    preprocessor.close()
    crops = list(preprocessor.map([png_of((40, 50, 60))]))
    assert tuple(crops[0][16, 16]) == (40, 50, 60)
    assert preprocessor.call_each(len, [b"ab", b"c"]) == [2, 1]


# --- The engine: failures while collecting, timings, channels_last off ----------------------------------------


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 1000)).eval()


TINY = {"resize_size": 32, "crop_size": 32}


class FailsWaitingFor(SimulatedRuntime):
    """A device error that surfaces when the results of one chunk are read (e.g. at a CUDA event sync)."""

    def __init__(self, failing: str):
        super().__init__(lost=False)
        self.failing = failing

    def fence(self, name):
        fence = super().fence(name)
        if name == self.failing:
            def failing_wait():
                raise sticky_error()
            fence.wait = failing_wait
        return fence


@pytest.mark.parametrize(("failing_chunk", "failed"), [
    (0, [True, True, False, False, False]),   # collected after chunk 1 was launched
    (1, [False, False, True, True, False]),
    (2, [False, False, False, False, True]),  # the last chunk, collected after the loop
])
def test_a_failure_while_collecting_a_chunk_costs_only_that_chunk(failing_chunk, failed):
    model = tiny_classifier()
    payloads = [png_of((40 * i, 200 - 30 * i, 90)) for i in range(5)]
    config = make_config(max_batch=2, **TINY)
    runtime = FailsWaitingFor(f"results[{failing_chunk}]")
    engine = InferenceEngine(config, model, torch.device("cpu"), runtime=runtime)
    results = engine.predict(payloads)
    healthy = engine_for(model, max_batch=2, **TINY)
    expected = healthy.predict(payloads)
    assert [isinstance(r, ImageError) and r.status == 500 for r in results] == failed
    assert ("probe",) in runtime.log  # the device was asked whether it survived
    assert_same_predictions([r for r, f in zip(results, failed, strict=True) if not f],
                            [e for e, f in zip(expected, failed, strict=True) if not f])
    assert engine.last_timings.rejected == {500: failed.count(True)}
    engine.close()
    healthy.close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class ClockedPreprocessor:
    """Hands over prepared items; each one 'takes' 1 s of the fake clock to decode."""

    def __init__(self, clock):
        self.clock = clock

    def map(self, items):
        for item in items:
            self.clock.now += 1.0
            yield item

    def close(self):
        pass


def test_timings_measure_decode_wait_and_inference(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(engine_module, "time", clock)
    tiny = tiny_classifier()

    def model(images):
        clock.now += 10.0  # each forward 'takes' 10 s
        return tiny(images)

    crops = [np.full((32, 32, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    items = [crops[0], crops[1], ImageError(400, "bad"), crops[2], crops[3], crops[4], crops[5]]
    engine = InferenceEngine(make_config(max_batch=2, **TINY), model, torch.device("cpu"),
                             preprocessor=ClockedPreprocessor(clock))
    collect = engine._collect

    def slow_collect(*args):
        clock.now += 0.5  # reading each chunk's results 'takes' 0.5 s
        return collect(*args)

    engine._collect = slow_collect
    results = engine.predict(items)
    assert results[2] == ImageError(400, "bad") and sum(isinstance(r, list) for r in results) == 6
    timings = engine.last_timings
    assert timings.decode_wait == pytest.approx(7.0)  # 7 items, 1 s each
    assert timings.inference == pytest.approx(31.5)   # 3 chunks of 2, 10 s each, and 3 collects of 0.5 s
    assert (timings.images, timings.rejected) == (7, {400: 1})


def test_timings_on_a_real_clock_are_positive_and_within_the_call(imagenet_photos):
    engine = engine_for(tiny_classifier(), max_batch=2)
    started = time.perf_counter()
    engine.predict(imagenet_photos[:3])
    elapsed = time.perf_counter() - started
    timings = engine.last_timings
    assert 0 < timings.inference < elapsed
    assert 0 < timings.decode_wait < elapsed
    assert timings.inference + timings.decode_wait <= elapsed
    engine.close()


def test_channels_last_off_gives_contiguous_nchw_with_the_same_values():
    model = tiny_classifier()
    mean, std = (0.1, 0.5, 0.9), (0.3, 0.2, 0.1)
    plain = engine_for(model, channels_last=False, mean=mean, std=std, **TINY)
    batch = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    images = plain.normalize(batch)
    assert images.shape == (2, 3, 32, 32)
    assert images.is_contiguous() and not images.is_contiguous(memory_format=torch.channels_last)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    payloads = [png_of((200, 10, 10)), png_of((10, 10, 200)), b"broken"]
    channels_last = engine_for(model, mean=mean, std=std, **TINY)
    assert_same_predictions(plain.predict(payloads), channels_last.predict(payloads))
    plain.close()
    channels_last.close()
