"""A client for the batched image classification server (TorchServe and this repository's handler).

    from image_batch_client import Client, read_keys
    with Client(token=read_keys()["inference"]) as client:       # http://127.0.0.1:8080, efficientnet_lite0
        entries = client.classify([Path("a.jpg"), Path("b.png")])  # one entry per image, in input order

Modules: ``client`` (``Client``: batching, transports, retries), ``cli`` (the ``image-batch-client`` command),
``grpc_transport`` (TorchServe's gRPC API; needs the ``grpc`` extra) and ``oip`` (the Open Inference Protocol's
JSON and binary layout, standard library only: the server's handler uses this module too).

The names below are imported on first use (PEP 562), so ``import image_batch_client.oip`` loads only the standard
library: a TorchServe archive carries this file and ``oip.py`` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_FROM_CLIENT = ("Client", "ClientError", "Retry", "classify", "classify_one_per_request", "find_key_file",
                "image_files", "read_keys", "DEFAULT_MODEL", "DEFAULT_URL", "TRANSPORTS")
__all__ = [*_FROM_CLIENT, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _FROM_CLIENT:
        return getattr(importlib.import_module(f"{__name__}.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_CLIENT])
