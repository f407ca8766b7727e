"""TorchServe entry point: adapts TorchServe's batch of requests to the engine, and back.

TorchServe batches *requests*; each may carry many images. Every image of every request goes
through the engine in one call, results are split back per request in input order, and each
request gets exactly one answer with its own HTTP status.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy
import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.backends import EAGER, choose_model_step, eager_step, weights_key
from handler.codecs import (
    EMBEDDING,
    TOPK,
    ImageError,
    Limits,
    ParsedRequest,
    Payload,
    RequestError,
    encode_response,
    parse_request,
)
from handler.config import HandlerConfig
from handler.device import DeviceLost, end_process
from handler.engine import InferenceEngine, Timings
from handler.model import (
    GATE_IMAGES_DIR,
    LABELS_FILE,
    load_labels,
    load_model,
    read_build_info,
    read_gate_images,
    resolve_device,
    warn_if_untrained,
)
from handler.outputs import Prediction, TopK
from handler.server_metrics import ServerMetrics
from image_batch_client import oip

logger = logging.getLogger(__name__)
# Embeddings in JSON: 7 decimals, an error of at most 5e-8 per value (float32's own step near 1.0 is 6e-8;
# a cosine of unit vectors moves by at most 2·sqrt(d)·5e-8, 4e-6 for d = 1280), ~11 characters a value, not 19.
EMBEDDING_DECIMALS = 7


def log_preprocessing(config: HandlerConfig, build_info: dict[str, Any]) -> None:
    """What the archive recorded at build time, and where each value came from (build_mar.py resolved it)."""
    sources = {key: row.get("source", "?") for key, row in build_info.get("preprocessing", {}).items()}
    logger.info(
        "model %s (%d classes): resize %d, center crop %d, %s, mean %s, std %s; sources: %s",
        config.architecture, config.num_classes, config.resize_size, config.crop_size, config.interpolation,
        list(config.mean), list(config.std),
        ", ".join(f"{key} <- {source}" for key, source in sources.items()) or "not recorded (archive built "
        "without scripts/build_mar.py)",
    )


def live_backend_workers(proc: Path = Path("/proc")) -> int:
    """TorchServe backend workers started by this worker's frontend, this one included (Linux; else 1)."""
    parent = os.getppid()
    count = 0
    for entry in proc.glob("[0-9]*"):
        try:
            parent_of_entry = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent_of_entry == parent and b"model_service_worker" in (entry / "cmdline").read_bytes():
                count += 1
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile, or one we may not read
    return max(count, 1)


def warn_if_oversubscribed(config: HandlerConfig, workers: int) -> bool:
    """Each worker sizes its threads for maxWorkers workers; more live workers than that share the cores."""
    if workers <= config.max_workers or (config.decode_threads and config.torch_threads):
        return False
    logger.warning(
        "%d TorchServe workers are running but maxWorkers is %d: each one sized its decode pool (%d threads) and "
        "torch threads (%d) for %d worker(s) on %d cores, so the cores are oversubscribed. Set maxWorkers: %d "
        "(the most workers you will scale to) in model-config.yaml and rebuild the archive "
        "(scripts/serve.sh does), or set decode_threads and torch_threads in its handler: section.",
        workers, config.max_workers, config.pool_size, config.intra_op_threads, config.max_workers,
        config.cpu_count, workers,
    )
    return True


class ImageBatchHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.model_name = context.manifest["model"]["modelName"]
        self.config = HandlerConfig.from_model_yaml(getattr(context, "model_yaml_config", None))
        torch.set_num_threads(self.config.intra_op_threads)
        self.device = resolve_device(self.config.device, properties.get("gpu_id"))
        weights_path = model_dir / context.manifest["model"]["serializedFile"]
        build_info = read_build_info(model_dir)
        log_preprocessing(self.config, build_info)
        model = load_model(self.config, weights_path, self.device)
        self.untrained = warn_if_untrained(build_info)
        self.labels = load_labels(model_dir / LABELS_FILE, self.config.num_classes)
        self.limits = Limits(
            max_images=self.config.max_images_per_request,
            max_image_bytes=self.config.max_image_bytes,
            max_topk=self.config.num_classes,
        )
        self.engine = InferenceEngine(self.config, model, self.device, step=eager_step(model, "fp32"))
        gate = self.engine.normalized(read_gate_images(model_dir / GATE_IMAGES_DIR))
        step, self.step_choice = choose_model_step(self.config, model, self.device, gate,
                                                   weights_key(weights_path, self.config))
        logger.info("%s", self.step_choice.describe())
        self.engine.use_step(step)
        if self.config.warmup or step.backend != EAGER:
            self._warm_up(model)
        self.initialized = True
        logger.info(
            "image batch handler ready: device=%s strategy=%s pool=%d torch_threads=%d max_batch=%d step=%s",
            self.device, self.config.decode_strategy, self.config.pool_size,
            self.config.intra_op_threads, self.config.max_batch, self.engine.step.describe(),
        )
        warn_if_oversubscribed(self.config, live_backend_workers())

    def _warm_up(self, model: torch.nn.Module) -> None:
        """Run every bucket once (compiling each, for a static-shape step); a step that fails here is replaced
        by the eager fp32 model."""
        started = time.perf_counter()
        try:
            sizes = self.engine.warm_up()
        except Exception:
            if self.engine.step.backend == EAGER and self.engine.step.exact:
                raise
            logger.warning("model step %s failed during warm-up; serving eager fp32", self.engine.step.describe(),
                           exc_info=True)
            self.engine.use_step(eager_step(model, "fp32", self.config.channels_last))
            sizes = self.engine.warm_up()
        logger.info("warmed up batch sizes %s on %s with %s in %.1f s (%d graphs built)", sizes, self.device,
                    self.engine.step.describe(), time.perf_counter() - started, self.engine.step.graphs_built())

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """One answer per request, always: whatever one request holds, the others are answered normally.

        Parsing and encoding run per request under a guard; only a failure of the model itself may cost
        images, and then only those of its chunk (the engine's guard).
        """
        started = time.perf_counter()
        requests = [self._parse(row, index, context) for index, row in enumerate(data)]
        accepted = [request for request in requests if isinstance(request, ParsedRequest)]
        payloads = [payload for request in accepted for payload in request.payloads]
        topk = max((request.topk or self.config.topk for request in accepted), default=1)
        kinds = frozenset().union(*(request.kinds for request in accepted))
        results = self._predict(payloads, topk, kinds)

        responses = []
        offset = 0
        for index, request in enumerate(requests):
            if isinstance(request, RequestError):
                responses.append(self._error_response(request, index, context))
                continue
            own = results[offset: offset + len(request.payloads)]
            offset += len(request.payloads)
            responses.append(self._encode(request, own, index, context))

        timings = self.engine.last_timings if payloads else Timings()
        ServerMetrics(getattr(context, "metrics", None)).record(len(data), timings, time.perf_counter() - started)
        return responses

    def _parse(self, row: Any, index: int, context: Any) -> ParsedRequest | RequestError:
        try:
            request = parse_request(row, self.limits, _request_header(context, index, oip.HEADER_LENGTH))
            if not request.kinds <= self.engine.output_kinds:
                raise RequestError(400, f"this model gives {', '.join(sorted(self.engine.output_kinds))} only: its "
                                        f"architecture ({self.config.architecture}) has no Linear head to take "
                                        f"embeddings from")
            return request
        except RequestError as error:
            return error
        except Exception:  # a bug of ours, met by this request only: it alone gets a 500
            logger.exception("could not parse request %d of the batch", index)
            return RequestError(500, "the server failed to read this request; see the server log")

    def _predict(self, payloads: list[Payload], topk: int, kinds: frozenset[str]) -> list[Prediction | ImageError]:
        if not payloads:
            return []
        try:
            return self.engine.predict_outputs(payloads, topk, kinds)
        except DeviceLost:  # every later batch would fail too, and TorchServe restarts only a worker that exits
            logger.critical("the GPU is unusable after a CUDA error; ending this worker so that TorchServe "
                            "starts a fresh one", exc_info=True)
            end_process()
        except Exception:  # the engine contains model failures per chunk; anything else is a bug of ours
            logger.exception("the engine failed on a batch of %d images", len(payloads))
            return [ImageError(500, "inference failed for this image; see the server log")] * len(payloads)

    def _encode(self, request: ParsedRequest, results: list[Prediction | ImageError], index: int,
                context: Any) -> str | bytes:
        """The response body of one request, serialized here so that no value can fail the batch later."""
        try:
            if len(results) == 1 and isinstance(results[0], ImageError):
                return self._error_response(results[0], index, context)
            entries = [result.to_json() if isinstance(result, ImageError) else self._entry(request, result)
                       for result in results]
            tensors = {}
            if any(output.name == "embeddings" for output in request.outputs):
                tensors["embeddings"] = embeddings_tensor(results, self.engine.embedding_size or 0)
            response = encode_response(request, entries, self.model_name, tensors)
        except Exception:
            logger.exception("could not encode the response of request %d", index)
            return self._error_response(RequestError(500, "the server failed to encode this response; see the "
                                                          "server log"), index, context)
        context.set_response_content_type(index, response.content_type)
        for name, value in response.headers.items():
            context.set_response_header(index, name, value)
        return response.body

    def _entry(self, request: ParsedRequest, prediction: Prediction) -> dict[str, Any]:
        """One image's entry: the outputs its request asked for, in JSON."""
        entry: dict[str, Any] = {}
        if TOPK in request.kinds:
            entry[TOPK] = self._labelled(prediction[TOPK][: request.topk or self.config.topk])
        if EMBEDDING in request.kinds and request.envelope != "kserve_v2":  # OIP: the "embeddings" tensor
            entry[EMBEDDING] = numpy.round(numpy.asarray(prediction[EMBEDDING]), EMBEDDING_DECIMALS).tolist()
        return entry

    @staticmethod
    def _error_response(error: ImageError | RequestError, index: int, context: Any) -> str:
        context.set_response_status(error.status, error.message, index)
        context.set_response_content_type(index, oip.JSON_CONTENT_TYPE)
        return json.dumps(error.to_json())

    def _labelled(self, topk: TopK) -> list[dict[str, Any]]:
        return [{"label": self.labels[i], "index": i, "score": round(score, 6)} for i, score in topk]


def embeddings_tensor(results: list[Prediction | ImageError], size: int) -> oip.Tensor:
    """The Open Inference Protocol ``embeddings`` output: FP32 [images, size]; a failed image's row is zeros
    (a real embedding is unit length), its error is in the ``predictions`` output."""
    rows = [[0.0] * size if isinstance(result, ImageError) else result[EMBEDDING] for result in results]
    return oip.Tensor("embeddings", oip.FP32, (len(rows), size), [value for row in rows for value in row])


def _request_header(context: Any, index: int, name: str) -> str | None:
    """An HTTP header of request ``index``: TorchServe passes them with the client's spelling of the name."""
    wanted = name.lower()
    for key, value in (context.get_all_request_header(index) or {}).items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None
