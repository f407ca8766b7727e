"""Custom TorchServe metrics for each handled batch (scraped at :8082/metrics in Prometheus mode)."""

from __future__ import annotations

import logging
from typing import Any

from handler.engine import Timings

logger = logging.getLogger(__name__)


class ServerMetrics:
    def __init__(self, metrics_cache: Any) -> None:
        self._cache = metrics_cache

    def record(self, requests: int, timings: Timings, handle_seconds: float) -> None:
        """ImagesProcessed counts the images classified, ImagesRejected{Status} those refused (their sum is
        every image received). Never raises: a metrics failure must not cost anyone an answer."""
        if self._cache is None:
            return
        try:
            from ts.metrics.dimension import Dimension

            self._cache.add_counter("ImagesProcessed", timings.images - sum(timings.rejected.values()))
            self._cache.add_metric("RequestsPerBatch", requests, "count", metric_type=_gauge())
            self._cache.add_metric("ImagesPerRequest", timings.images / max(requests, 1), "count",
                                   metric_type=_gauge())
            self._cache.add_time("DecodeWaitTime", timings.decode_wait * 1e3)
            self._cache.add_time("InferenceTime", timings.inference * 1e3)
            self._cache.add_time("BatchHandleTime", handle_seconds * 1e3)
            for status, count in sorted(timings.rejected.items()):
                self._cache.add_counter("ImagesRejected", count, dimensions=[Dimension("Status", str(status))])
        except Exception:  # metrics are best-effort by design
            logger.warning("could not record metrics", exc_info=True)


def _gauge() -> Any:
    from ts.metrics.metric_type_enum import MetricTypes

    return MetricTypes.GAUGE
