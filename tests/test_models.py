"""Models beyond the demo, end to end: torchvision's mobilenet_v3_large and timm's resnet18 at 288 px, each served
with its own preprocessing and checked against that model's own reference pipeline. (Both preprocess exactly as
their bigger siblings resnet50 do, IMAGENET1K_V2's 232/224 and timm's a1_in1k: cheaper to build and serve.)

No trained weights for these two ship in a registry package, so they carry seeded random weights: the
served answers are compared with the same archive run in this process, and the crops with the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import REPO, keep_logs_if_failed

from handler.config import HandlerConfig
from handler.engine import InferenceEngine
from handler.model import load_model
from tests.harness.reference import open_rgb, torchvision_transform
from tests.harness.ts_server import TorchServe

pytestmark = pytest.mark.e2e
TIMM_288 = "timm_resnet18_288"


def timm_288_transform():
    """timm's eval transform for resnet18/resnet50 at their test size (288 px, crop_pct 1.0), straight from timm."""
    from timm.data import create_transform

    return create_transform(input_size=(3, 288, 288), crop_pct=1.0, interpolation="bicubic",
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


MODELS = {  # archive name -> (reference transform, the handler: values the archive must record)
    "mobilenet_v3_large": (lambda: torchvision_transform("mobilenet_v3_large"),
                 {"resize_size": 232, "crop_size": 224, "interpolation": "bilinear"}),  # IMAGENET1K_V2's
    TIMM_288: (timm_288_transform, {"resize_size": 288, "crop_size": 288, "interpolation": "bicubic"}),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    build = [sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(folder),
             "--skip-step-check"]  # the server chooses its step at start-up; tests/test_build.py checks the build's
    built = subprocess.run([*build, "--arch", "mobilenet_v3_large"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    config = folder / "timm-288.yaml"
    settings = yaml.safe_load((REPO / "model-config.yaml").read_text())
    settings["handler"].update({"crop_size": 288, "crop_pct": 1.0})
    config.write_text(yaml.safe_dump(settings))
    done = subprocess.run([*build, "--arch", "timm:resnet18", "--model-name", TIMM_288, "--config", str(config)],
                          check=True, capture_output=True, text=True)
    assert "resize_size    288" in done.stdout and "model-config.yaml crop_pct 1.0" in done.stdout
    return folder


def unpacked(store, name, folder):
    with zipfile.ZipFile(store / f"{name}.mar") as archive:
        archive.extractall(folder)
    return HandlerConfig.from_model_yaml(yaml.safe_load((folder / "model-config.yaml").read_text()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_archive_records_the_models_own_preprocessing(store, name, tmp_path):
    config = unpacked(store, name, tmp_path)
    _, expected = MODELS[name]
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.mean == pytest.approx((0.485, 0.456, 0.406)) and config.std == pytest.approx((0.229, 0.224, 0.225))
    info = json.loads((tmp_path / "build_info.json").read_text())
    assert info["weights"]["source"] == "random"
    sources = {key: row["source"] for key, row in info["preprocessing"].items()}
    if name == TIMM_288:
        assert sources["crop_size"] == "model-config.yaml" and sources["interpolation"].startswith("timm")
    else:
        assert all(sources[key].startswith("torchvision weights") for key in ("crop_size", "resize_size", "mean"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_crops_match_the_models_reference_pipeline(store, name, tmp_path, imagenet_photos, mixed_images):
    config = unpacked(store, name, tmp_path)
    transform_for, _ = MODELS[name]
    transform = transform_for()
    engine = InferenceEngine(config, torch.nn.Identity(), torch.device("cpu"))
    photos = [*imagenet_photos[:4], mixed_images["exif_rotated.jpg"], mixed_images["wide.jpg"]]
    crops = np.stack(list(engine.preprocessor.map(photos)))
    ours = engine.normalize(torch.from_numpy(crops)).float()
    reference = torch.stack([transform(open_rgb(photo)) for photo in photos])
    one_level = 1 / 255 / min(config.std)
    assert ours.shape == reference.shape == (len(photos), 3, config.crop_size, config.crop_size)
    assert (ours - reference).abs().max() <= one_level * 1.01
    engine.close()


@pytest.fixture(scope="module")
def server(store, request):
    server = TorchServe(store, [f"{name}.mar" for name in sorted(MODELS)])
    server.start()
    yield server
    server.stop()
    keep_logs_if_failed(server, request)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_served_answers_equal_the_archive_run_in_process(server, store, name, tmp_path, imagenet_photos):
    config = unpacked(store, name, tmp_path)
    engine = InferenceEngine(config, load_model(config, tmp_path / f"{name}.pt", torch.device("cpu")),
                             torch.device("cpu"))
    photos = imagenet_photos[:4]
    expected = engine.predict(photos)
    engine.close()
    response = requests.post(f"{server.inference_url}/predictions/{name}", headers=server.headers(), timeout=300,
                             files={f"image{i}": photo for i, photo in enumerate(photos)})
    assert response.status_code == 200, response.text[:300]
    for entry, want in zip(response.json(), expected, strict=True):
        assert [item["index"] for item in entry["topk"]] == [index for index, _ in want]
        assert [item["score"] for item in entry["topk"]] == pytest.approx([s for _, s in want], abs=1e-4)
