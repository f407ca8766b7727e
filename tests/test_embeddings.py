"""Image embeddings through a real TorchServe serving the trained demo: chosen per request, in every format.

Near-duplicates: photos of the corpus (each from a different scikit-image photo) and edited copies of
them (re-encoded at a low JPEG quality, downscaled, slightly cropped); every copy must find its own
original as its nearest neighbour by cosine.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from conftest import DEMO_MODEL_NAME
from PIL import Image

from image_batch_client.client import Client

pytestmark = pytest.mark.e2e
MODEL = DEMO_MODEL_NAME
EMBEDDING_SIZE = 1280  # EfficientNet-Lite0's pooled features


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def embed(server, photos, outputs=("embedding",), **extra):
    body = {"images": [base64.b64encode(photo).decode() for photo in photos], "outputs": list(outputs), **extra}
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body, headers=server.headers(),
                             timeout=300)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def vectors(entries):
    return np.array([entry["embedding"] for entry in entries], dtype=np.float64)


def edited_copies(photo: bytes) -> dict[str, bytes]:
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    width, height = image.size

    def jpeg(picture, quality=90):
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    return {
        "low_quality": jpeg(image, quality=25),
        "downscaled": jpeg(image.resize((width // 2, height // 2), Image.Resampling.BICUBIC)),
        "cropped": jpeg(image.crop((width // 20, height // 20, width - width // 20, height - height // 20))),
    }


def test_every_edited_copy_finds_its_own_original(server, imagenet_photos):
    originals = imagenet_photos[:12]  # the corpus' first 12: one view of each of 12 different photos
    copies = [(index, kind, data) for index, photo in enumerate(originals)
              for kind, data in edited_copies(photo).items()]
    original_vectors = vectors(embed(server, originals))
    copy_vectors = vectors(embed(server, [data for _, _, data in copies]))
    similarity = copy_vectors @ original_vectors.T  # unit vectors: cosine
    nearest = similarity.argmax(axis=1)
    recall = float(np.mean([nearest[row] == index for row, (index, _, _) in enumerate(copies)]))
    own = [similarity[row, index] for row, (index, _, _) in enumerate(copies)]
    others = similarity.copy()
    others[np.arange(len(copies)), [index for index, _, _ in copies]] = -1
    print(f"\nnear-duplicate recall@1: {recall:.3f} over {len(copies)} edited copies of {len(originals)} photos; "
          f"cosine to own original min {min(own):.3f}, to the best other max {others.max():.3f}")
    misses = [(kind, index, int(nearest[row])) for row, (index, kind, _) in enumerate(copies) if nearest[row] != index]
    assert recall == 1.0, misses


def test_vectors_are_unit_length_and_stable_across_batches(server, imagenet_photos):
    photo = imagenet_photos[20]
    alone = vectors(embed(server, [photo]))
    in_a_batch = vectors(embed(server, [*imagenet_photos[30:37], photo, *imagenet_photos[40:45]]))
    assert in_a_batch.shape == (13, EMBEDDING_SIZE)
    np.testing.assert_allclose(np.linalg.norm(in_a_batch, axis=1), 1.0, atol=1e-5)
    assert float(alone[0] @ in_a_batch[7]) >= 0.9999
    assert float(in_a_batch[0] @ in_a_batch[7]) < 0.99  # a different photo is not the same vector


def test_a_bad_image_gets_its_error_and_the_others_their_vectors(server, imagenet_photos):
    entries = embed(server, [imagenet_photos[0], b"not an image at all", imagenet_photos[1]])
    assert entries[1]["error"]["status"] == 415
    assert set(entries[0]) == set(entries[2]) == {"embedding"}
    assert len(entries[0]["embedding"]) == EMBEDDING_SIZE


def test_topk_and_embedding_in_one_request_agree_with_two_separate_requests(server, imagenet_photos, samples):
    photos = [samples["cat.jpg"], samples["coffee.jpg"], imagenet_photos[3]]
    both = embed(server, photos, outputs=("topk", "embedding"))
    only_topk = embed(server, photos, outputs=("topk",))
    only_embedding = embed(server, photos)
    assert [entry["topk"] for entry in both] == [entry["topk"] for entry in only_topk]
    assert "embedding" not in only_topk[0] and "topk" not in only_embedding[0]
    cosines = np.sum(vectors(both) * vectors(only_embedding), axis=1)
    assert np.all(cosines >= 0.9999)
    plain = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.headers(), timeout=120,
                          json={"images": [base64.b64encode(photos[0]).decode()]}).json()
    assert set(plain[0]) == {"topk"}  # the default is unchanged for today's clients


def test_multipart_and_kserve_v1_choose_outputs_too(server, imagenet_photos):
    url = f"{server.inference_url}/predictions/{MODEL}"
    multipart = requests.post(url, files={"a": imagenet_photos[0], "outputs": (None, "embedding,topk")},
                              headers=server.headers(), timeout=120).json()
    assert set(multipart[0]) == {"topk", "embedding"}
    v1 = requests.post(f"{server.inference_url}/v1/models/{MODEL}:predict", headers=server.headers(), timeout=120,
                       json={"instances": [{"data": base64.b64encode(imagenet_photos[0]).decode()}],
                             "outputs": ["embedding"]}).json()
    cosine = np.dot(v1["predictions"][0]["embedding"], multipart[0]["embedding"])
    assert cosine >= 0.9999
    refused = requests.post(url, files={"a": imagenet_photos[0], "outputs": (None, "labels")},
                            headers=server.headers(), timeout=120)
    assert refused.status_code == 400 and "outputs must name one or more of topk, embedding" in refused.text


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_gets_an_fp32_embeddings_tensor(server, imagenet_photos, binary):
    photos = [imagenet_photos[0], b"\xff\xd8\xff broken", imagenet_photos[1]]
    client = triton.InferenceServerClient(server.inference_url.removeprefix("http://"))
    images = triton.InferInput("images", [len(photos)], "BYTES")
    elements = photos if binary else [base64.b64encode(photo).decode() for photo in photos]  # JSON: base64 text
    images.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    outputs = [triton.InferRequestedOutput("embeddings", binary_data=binary),
               triton.InferRequestedOutput("predictions", binary_data=binary)]
    result = client.infer(MODEL, [images], outputs=outputs, headers=server.headers())
    table = result.as_numpy("embeddings")
    assert table.shape == (3, EMBEDDING_SIZE) and table.dtype == np.float32
    predictions = [json.loads(item) for item in result.as_numpy("predictions")]
    assert predictions[1]["error"]["status"] == 400 and not table[1].any()  # a failed image's row is zeros
    reference = vectors(embed(server, [photos[0], photos[2]]))
    assert np.all(np.sum(table[[0, 2]] * reference, axis=1) >= 0.9999)


def test_our_client_returns_embeddings_in_every_transport(server, imagenet_photos):
    photos = imagenet_photos[:3]
    reference = vectors(embed(server, photos))
    for transport in ("oip-binary", "oip-json", "json", "multipart"):
        with Client(server.inference_url, MODEL, server.keys["inference"], transport, outputs=("embedding",)) as client:
            entries = client.classify(photos)
        assert [set(entry) for entry in entries] == [{"embedding"}] * 3, transport
        assert np.all(np.sum(vectors(entries) * reference, axis=1) >= 0.9999), transport
