"""Batched image classification and embeddings for TorchServe: a server-independent engine, a thin handler.

Modules: ``config`` (validated settings), ``codecs`` (request formats), ``oip`` (the Open Inference
Protocol's JSON and binary layout, torch-free, shared with the client), ``imaging`` (decode one
image to a uint8 crop), ``preprocess`` (decode strategies), ``architectures`` (models by name and their
own preprocessing), ``device`` (fences, staging buffers, copies back to the host, lost-device verdict),
``device_decode`` (batched JPEG decode on the GPU), ``engine`` (batching, device, model), ``outputs``
(top-k and embeddings from one forward), ``model`` (loading), ``server_metrics`` and
``torchserve_handler`` (the only modules that touch TorchServe).
"""
