"""Measure the engine's pipeline on the simulated GPU (tests/harness/simulated_device.py): how long one request takes
and how busy the device is, for each way of cutting requests into chunks (chunks_per_request) and each bucket set.

The device costs are assumptions (stated in the output), not measurements of a GPU: nvJPEG and ResNet-50 fp16 on a
recent data-centre GPU, roughly. The engine, its threads, its fences and its waits are the real ones; the device
is a timeline per stream. bench/gpu_check.py measures the same request on a real GPU.

    .venv/bin/python tests/harness/measure_pipeline.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# The test modules it borrows from import each other by name, as under pytest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch
from conftest import make_config
from test_gpu_simulated import RecordingBackend, jpeg, tiny_classifier

from handler.device_decode import DeviceJpegDecoder
from handler.engine import InferenceEngine, bucket_for
from handler.preprocess import transform_spec
from tests.harness.simulated_device import SimulatedCuda, SimulatedCudaRuntime, TimedModel

# seconds: (decode host per image, decode device per image, model base, model per image)
SCENARIOS = {
    "ImageNet-size": (0.0001, 0.0004, 0.0020, 0.0004),
    "12 MP": (0.0010, 0.0040, 0.0020, 0.0004),
}
BUCKETS = {"1,8,32 (old default)": (1, 8, 32), "1,2,4,..,32 (default)": (1, 2, 4, 8, 16, 32)}


def measure(cuda: SimulatedCuda, scenario: tuple[float, ...], images: int, chunks: int, buckets: tuple[int, ...],
            repeats: int) -> dict[str, float]:
    host, device, base, per_image = scenario
    backend = RecordingBackend(cuda, device_seconds_per_image=device, host_seconds_per_image=host)
    model = TimedModel(tiny_classifier(), cuda, base=base, per_image=per_image)
    config = make_config(device="cuda", resize_size=32, crop_size=32, max_batch=32, batch_buckets=buckets,
                         chunks_per_request=chunks)
    runtime = SimulatedCudaRuntime(cuda, 1)
    decoder = DeviceJpegDecoder(transform_spec(config), torch.device("cuda", 1), backend=backend.backend(),
                                runtime=runtime)
    engine = InferenceEngine(config, model, torch.device("cuda", 1), device_decoder=decoder, runtime=runtime)
    payloads = [jpeg((7 * i % 256, 100, 90)) for i in range(images)]
    engine.predict(payloads)  # warm
    walls, busy, shapes = [], [], []
    for _ in range(repeats):
        cuda.log.clear()
        started = time.perf_counter()
        engine.predict(payloads)
        wall = time.perf_counter() - started
        launches = [op for op in cuda.log if op.kind == "launch"]
        walls.append(wall)
        busy.append(sum(op.end - op.start for op in launches if op.detail["what"].startswith("model")) / wall)
        shapes = [int(op.detail["what"][6:-1]) for op in launches if op.detail["what"].startswith("model")]
    engine.close()
    return {"ms": 1000 * statistics.median(walls), "model_busy": statistics.median(busy), "chunks": len(shapes),
            "padded": sum(shapes) - images, "plan": "+".join(str(bucket_for(s, buckets)) for s in shapes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with pytest.MonkeyPatch.context() as monkeypatch:
        cuda = SimulatedCuda(devices=2).install(monkeypatch)
        for name, scenario in SCENARIOS.items():
            print(f"\n{name}: decode {scenario[0] * 1e3:.1f} ms host + {scenario[1] * 1e3:.1f} ms device per image; "
                  f"model {scenario[2] * 1e3:.1f} ms + {scenario[3] * 1e3:.2f} ms per image (assumed)")
            print(f"{'images':>6} {'buckets':<20} {'chunks/request':>14} {'p50 ms':>8} {'model busy':>10} "
                  f"{'padded':>6}  forwards")
            for images in (9, 32, 64):
                for bucket_name, buckets in BUCKETS.items():
                    for chunks in (1, 2, 3):
                        row = measure(cuda, scenario, images, chunks, buckets, args.repeats)
                        print(f"{images:>6} {bucket_name:<20} {chunks:>14} {row['ms']:>8.1f} "
                              f"{row['model_busy']:>10.0%} {row['padded']:>6}  {row['plan']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
