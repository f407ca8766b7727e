"""Batched image classification and embeddings for TorchServe: a server-independent engine, a thin handler.

Modules: ``config`` (validated settings), ``codecs`` (request formats; the Open Inference Protocol's JSON
and binary layout is ``image_batch_client.oip``, the one module the client and the handler share),
``imaging`` (decode one image to a uint8 crop), ``preprocess`` (decode strategies), ``architectures``
(models by name and their own preprocessing), ``device`` (fences, staging buffers, copies back to the
host, lost-device verdict), ``device_decode`` (batched JPEG decode on the GPU), ``engine`` (batching,
device, model), ``outputs`` (top-k and embeddings from one forward), ``model`` (loading),
``server_metrics`` and ``torchserve_handler`` (the only modules that touch TorchServe).
"""
