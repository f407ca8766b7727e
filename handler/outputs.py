"""The engine's output stage: what one forward gives per image, one small place per output kind.

A forward yields the model's pooled pre-logits features and the logits computed from them. Each output
kind turns those into device tensors (``on_device``), which travel to the host together, and then into one
value per image (``on_host``). ``topk``: the k most probable classes with their softmax scores.
``embedding``: the pre-logits features, L2-normalised unless the settings say otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from handler.codecs import EMBEDDING, TOPK  # the kinds' names are part of the wire format

TopK = list[tuple[int, float]]  # (class index, probability), best first
Prediction = dict[str, Any]  # output kind -> that image's value, for the kinds asked for


class SplitClassifier(torch.nn.Module):
    """A classifier as ``body`` (images -> pooled pre-logits features) and ``head`` (features -> logits):
    one forward returns both, at the cost of the plain model."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.embedding_size = head.in_features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images).flatten(1)
        return features, self.head(features)


def split_classifier(model: torch.nn.Module, num_classes: int) -> SplitClassifier | None:
    """The model with its final Linear layer taken out as the head (timm's ``get_classifier()``, or the last
    Linear with ``num_classes`` outputs: torchvision's ``fc``, ``classifier[-1]``, ``heads.head`` ...);
    None when there is none (e.g. TorchScript, or a convolutional head). Takes the model apart: pass a copy
    if the plain model is still needed."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_classes]
        head = linears[-1] if linears else None
    if head is None or isinstance(model, torch.jit.ScriptModule):
        return None
    parent, attribute = _parent_of(model, head)
    setattr(parent, attribute, torch.nn.Identity())
    return SplitClassifier(model, head)


def _parent_of(model: torch.nn.Module, target: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ValueError(f"{type(target).__name__} is not part of the model")  # pragma: no cover - found above


@dataclass(frozen=True)
class Forward:
    """One chunk's model results on the device, for its real images only (padding cut off)."""

    logits: torch.Tensor
    features: torch.Tensor | None  # None: the model offers no embedding


@dataclass(frozen=True)
class Request:
    """What the outputs of one engine call need to know."""

    kinds: frozenset[str]
    topk: int
    normalize_embeddings: bool


@dataclass(frozen=True)
class OutputKind:
    on_device: Callable[[Forward, Request], dict[str, torch.Tensor]]
    on_host: Callable[[dict[str, list]], list[Any]]  # host lists of one chunk -> one value per image


def _topk_on_device(forward: Forward, request: Request) -> dict[str, torch.Tensor]:
    scores, indices = torch.topk(torch.softmax(forward.logits.float(), dim=1), request.topk, dim=1)
    return {"topk_scores": scores, "topk_indices": indices}


def _topk_on_host(lists: dict[str, list]) -> list[TopK]:
    return [list(zip(indices, scores, strict=True))
            for scores, indices in zip(lists["topk_scores"], lists["topk_indices"], strict=True)]


def _embedding_on_device(forward: Forward, request: Request) -> dict[str, torch.Tensor]:
    features = forward.features.float()  # type: ignore[union-attr]  # checked in outputs_on_device
    if request.normalize_embeddings:
        features = torch.nn.functional.normalize(features, dim=1)
    return {"embedding": features}


def _embedding_on_host(lists: dict[str, list]) -> list[list[float]]:
    return lists["embedding"]


KINDS: dict[str, OutputKind] = {
    TOPK: OutputKind(_topk_on_device, _topk_on_host),
    EMBEDDING: OutputKind(_embedding_on_device, _embedding_on_host),
}


def outputs_on_device(forward: Forward, request: Request) -> dict[str, torch.Tensor]:
    if EMBEDDING in request.kinds and forward.features is None:
        raise ValueError("this model offers no embedding output")  # the handler refuses such requests earlier
    tensors: dict[str, torch.Tensor] = {}
    for kind in request.kinds:
        tensors.update(KINDS[kind].on_device(forward, request))
    return tensors


def predictions_on_host(lists: dict[str, list], kinds: Collection[str], count: int) -> list[Prediction]:
    """One dict per image of the chunk: output kind -> value."""
    rows: list[Prediction] = [{} for _ in range(count)]
    for kind in kinds:
        for row, value in zip(rows, KINDS[kind].on_host(lists), strict=True):
            row[kind] = value
    return rows
