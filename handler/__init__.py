"""Batched image classification for TorchServe: a server-independent engine and a thin handler.

Modules: ``config`` (validated settings), ``codecs`` (request formats), ``imaging`` (decode one
image to a uint8 crop), ``preprocess`` (decode strategies), ``engine`` (batching, device, model),
``model`` (loading), ``torchserve_handler`` (the TorchServe adapter).
"""
