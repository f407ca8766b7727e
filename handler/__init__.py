"""Batched image classification for TorchServe: a server-independent engine and a thin handler.

Modules: ``config`` (validated settings), ``codecs`` (request formats), ``oip`` (the Open Inference
Protocol's JSON and binary layout, torch-free, shared with the client), ``imaging`` (decode one
image to a uint8 crop), ``preprocess`` (decode strategies), ``architectures`` (models by name and their
own preprocessing), ``device`` (fences, staging buffers, copies back to the host, lost-device verdict),
``device_decode`` (batched JPEG decode on the GPU), ``engine`` (batching, device, model), ``model``
(loading), ``server_metrics`` and ``torchserve_handler`` (the only modules that touch TorchServe).
"""
