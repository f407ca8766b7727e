"""The two preprocessing baselines the benchmarks compare against, needing only torch, torchvision and Pillow
(bench/gpu_check.py runs them on a bare GPU box):

  stock   TorchServe's image_classifier: per image Image.open + Resize / CenterCrop / ToTensor / Normalize in
          float32 (``transform``: the model's own numbers), sequential, then torch.stack and .to(device)
  recipe  a torch DataLoader built per request (num_workers N, pin_memory on CUDA) over a dataset doing the same
          float transform per image
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from handler.imaging import to_rgb  # noqa: E402
from tests.harness.reference import Transform  # noqa: E402


def stock_batch(images: Sequence[bytes], device: torch.device, torch_threads: int = 0, *,
                transform: Transform) -> torch.Tensor:
    """What the stock VisionHandler.preprocess does, plus its .to(device).

    TorchServe leaves torch at its default thread count; on a busy 2-core machine the float ops of
    small images can run faster on one thread, so that variant is timed too and the better one counts.
    """
    previous = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        tensors = [transform(Image.open(io.BytesIO(payload))) for payload in images]
        return torch.stack(tensors).to(device)
    finally:
        torch.set_num_threads(previous)


class RecipeDataset(Dataset):
    """The usual recipe's dataset: decode, convert to RGB, float transform, one image per item."""

    def __init__(self, images: Sequence[bytes], transform: Transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(to_rgb(Image.open(io.BytesIO(self.images[index]))))


def recipe_batch(images: Sequence[bytes], device: torch.device, workers: int, *,
                 transform: Transform) -> torch.Tensor:
    """A DataLoader per request, as commonly written: its workers start (and stop) on every call."""
    loader = DataLoader(RecipeDataset(images, transform), batch_size=len(images), num_workers=workers,
                        pin_memory=device.type == "cuda")
    batches = [batch.to(device, non_blocking=True) for batch in loader]
    return batches[0]
