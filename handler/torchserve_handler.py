"""TorchServe entry point: adapts TorchServe's batch of requests to the engine, and back.

TorchServe batches *requests*; each may carry many images. Every image of every request goes
through the engine in one call, results are split back per request in input order, and each
request gets exactly one answer with its own HTTP status.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.codecs import ImageError, Limits, ParsedRequest, RequestError, encode_response, parse_request
from handler.config import HandlerConfig
from handler.engine import InferenceEngine, Timings, TopK
from handler.model import (
    LABELS_FILE,
    compile_or_eager,
    eager_model,
    load_labels,
    load_model,
    resolve_device,
    warn_if_untrained,
)
from handler.server_metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ImageBatchHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.model_name = context.manifest["model"]["modelName"]
        self.config = HandlerConfig.from_model_yaml(getattr(context, "model_yaml_config", None))
        torch.set_num_threads(self.config.intra_op_threads)
        self.device = resolve_device(self.config.device, properties.get("gpu_id"))
        weights_path = model_dir / context.manifest["model"]["serializedFile"]
        model = load_model(self.config, weights_path, self.device)
        self.untrained = warn_if_untrained(model_dir)
        self.labels = load_labels(model_dir / LABELS_FILE, self.config.num_classes)
        self.limits = Limits(
            max_images=self.config.max_images_per_request,
            max_image_bytes=self.config.max_image_bytes,
            max_topk=self.config.num_classes,
        )
        self.engine = InferenceEngine(self.config, compile_or_eager(model, self.config.compile), self.device)
        if self.config.warmup or self.config.compile:
            self._warm_up()
        self.initialized = True
        logger.info(
            "image batch handler ready: device=%s strategy=%s pool=%d torch_threads=%d max_batch=%d",
            self.device, self.config.decode_strategy, self.config.pool_size,
            self.config.intra_op_threads, self.config.max_batch,
        )

    def _warm_up(self) -> None:
        """Run every bucket once; a model that fails to compile here is replaced by its eager self."""
        try:
            sizes = self.engine.warm_up()
        except Exception:
            if self.engine.model is eager_model(self.engine.model):
                raise
            logger.warning("the compiled model failed during warm-up; serving the eager model", exc_info=True)
            self.engine.model = eager_model(self.engine.model)
            sizes = self.engine.warm_up()
        logger.info("warmed up batch sizes %s on %s", sizes, self.device)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        started = time.perf_counter()
        parsed: list[ParsedRequest | RequestError] = []
        for row in data:
            try:
                parsed.append(parse_request(row, self.limits))
            except RequestError as error:
                parsed.append(error)

        payloads = [p for request in parsed if isinstance(request, ParsedRequest) for p in request.payloads]
        topk = max((r.topk or self.config.topk for r in parsed if isinstance(r, ParsedRequest)), default=1)
        results = self.engine.predict(payloads, topk) if payloads else []

        responses = []
        offset = 0
        for index, request in enumerate(parsed):
            if isinstance(request, RequestError):
                context.set_response_status(request.status, request.message, index)
                responses.append(request.to_json())
                continue
            own = results[offset: offset + len(request.payloads)]
            offset += len(request.payloads)
            responses.append(self._respond(request, own, index, context))

        timings = self.engine.last_timings if payloads else Timings()
        ServerMetrics(getattr(context, "metrics", None)).record(len(data), timings, time.perf_counter() - started)
        return responses

    def _respond(self, request: ParsedRequest, results: list[TopK | ImageError], index: int, context: Any) -> Any:
        if len(results) == 1 and isinstance(results[0], ImageError):
            error = results[0]
            context.set_response_status(error.status, error.message, index)
            return error.to_json()
        topk = request.topk or self.config.topk
        entries = [
            result.to_json() if isinstance(result, ImageError) else {"topk": self._labelled(result[:topk])}
            for result in results
        ]
        return encode_response(request, entries, self.model_name)

    def _labelled(self, topk: TopK) -> list[dict[str, Any]]:
        return [{"label": self.labels[i], "index": i, "score": round(score, 6)} for i, score in topk]
