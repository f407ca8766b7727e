"""Decode strategies: how a list of payloads becomes uint8 crops, in order.

- ``threads``: a pool created once and reused by every request (PIL releases the GIL while it
  decodes and resamples, so threads scale across cores without forking a CUDA process).
- ``dataloader``: the well-known recipe, a torch DataLoader built per request with num_workers and
  pin_memory; kept selectable so the two can be compared on the same machine.
- ``inline``: a plain loop in the calling thread, the baseline.

All three run the same per-image function, so they produce identical crops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from handler.codecs import ImageError, Payload
from handler.config import HandlerConfig
from handler.imaging import TransformSpec, decode_and_transform

Decoded = np.ndarray | ImageError
T = TypeVar("T")
R = TypeVar("R")


def transform_spec(config: HandlerConfig) -> TransformSpec:
    return TransformSpec(
        resize_size=config.resize_size,
        crop_size=config.crop_size,
        max_image_pixels=config.max_image_pixels,
        allowed_formats=config.allowed_formats,
        reduced_jpeg_decode=config.reduced_jpeg_decode,
        draft_margin=config.draft_margin,
        interpolation=config.interpolation,
    )


def _decode_one(payload: Payload, spec: TransformSpec) -> Decoded:
    if isinstance(payload, ImageError):
        return payload
    return decode_and_transform(payload, spec)


class Preprocessor:
    """Maps payloads to crops with the configured strategy. Create once; ``close()`` at shutdown."""

    def __init__(self, config: HandlerConfig) -> None:
        self.strategy = config.decode_strategy
        self.spec = transform_spec(config)
        self._config = config
        self._pool: ThreadPoolExecutor | None = None
        if self.strategy == "threads":
            self._pool = ThreadPoolExecutor(max_workers=config.pool_size, thread_name_prefix="decode")

    def map(self, payloads: Sequence[Payload]) -> Iterator[Decoded]:
        """One result per payload, in input order, each as soon as it is ready.

        With the thread pool every payload is submitted by this call, before the first result is asked for,
        so the pool decodes while the caller does something else.
        """
        if self._pool is not None:
            futures = [self._pool.submit(_decode_one, payload, self.spec) for payload in payloads]
            return (future.result() for future in futures)
        if self.strategy == "dataloader":
            return self._map_with_dataloader(payloads)
        return (_decode_one(payload, self.spec) for payload in payloads)

    def call_each(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``function`` applied to every item, on the pool's threads when there is a pool."""
        if self._pool is not None:
            return list(self._pool.map(function, items))
        return [function(item) for item in items]

    def _map_with_dataloader(self, payloads: Sequence[Payload]) -> Iterator[Decoded]:
        config = self._config
        loader = DataLoader(
            _PayloadDataset(payloads, self.spec),
            batch_size=config.dataloader_batch_size,
            num_workers=config.dataloader_workers,
            pin_memory=config.pin_memory and torch.cuda.is_available(),
            collate_fn=_collate_crops,
            multiprocessing_context=config.dataloader_start_method if config.dataloader_workers else None,
        )
        for crops, positions, errors in loader:
            results: list[Decoded | None] = [None] * (len(positions) + len(errors))
            for row, position in enumerate(positions):
                results[position] = crops[row].numpy()
            for position, error in errors:
                results[position] = error
            yield from results  # type: ignore[misc]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _PayloadDataset(Dataset):
    def __init__(self, payloads: Sequence[Payload], spec: TransformSpec) -> None:
        self.payloads = payloads
        self.spec = spec

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, index: int) -> Decoded:
        return _decode_one(self.payloads[index], self.spec)


def _collate_crops(items: list[Decoded]) -> tuple[torch.Tensor, list[int], list[tuple[int, ImageError]]]:
    """Stack the good crops into one uint8 tensor (pinnable); keep errors with their positions."""
    positions = [i for i, item in enumerate(items) if not isinstance(item, ImageError)]
    errors = [(i, item) for i, item in enumerate(items) if isinstance(item, ImageError)]
    if positions:
        crops = torch.from_numpy(np.stack([items[i] for i in positions]))
    else:
        crops = torch.empty((0,), dtype=torch.uint8)
    return crops, positions, errors
