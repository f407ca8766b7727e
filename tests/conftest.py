"""Shared fixtures: the real-photo corpus (made from scikit-image's bundled photos) and small models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_corpus import write_corpus  # noqa: E402

from handler.config import HandlerConfig  # noqa: E402


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
    return {path.name: path.read_bytes() for path in sorted((corpus / "mixed").iterdir())}


@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    """A real, smaller torchvision classifier (seeded ResNet-18: its softmax is peaked, unlike MobileNet's)."""
    torch.manual_seed(0)
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=1000).eval()


def keep_logs_if_failed(server, request) -> None:
    """Remove a test TorchServe's folder, unless a test failed: then keep its logs and say where."""
    if request.session.testsfailed:
        print(f"\nTorchServe logs kept in {server.workdir / 'logs'}")
    else:
        server.cleanup()


def make_config(**overrides: object) -> HandlerConfig:
    values = {"decode_threads": 2, "max_batch": 8, "warmup": False, "cpu_count": 2}
    values.update(overrides)
    return HandlerConfig(**values)  # type: ignore[arg-type]
