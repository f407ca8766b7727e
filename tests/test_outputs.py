"""The engine's output stage without a server: embeddings are the input of the model's own final layer, and
one forward gives them with the same top-k as a classification-only call."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import DEMO_PREPROCESSING, make_config

from handler.architectures import build_architecture
from handler.codecs import EMBEDDING, TOPK
from handler.engine import InferenceEngine
from handler.outputs import SplitClassifier, split_classifier


def final_layer_input_and_output(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor):
    """What the model's last Linear layer receives and the model returns, seen from a hook on the whole model."""
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, output: seen.update(features=args[0]))
    with torch.inference_mode():
        logits = model(images)
    handle.remove()
    return seen["features"].flatten(1), logits


@pytest.mark.parametrize(("arch", "layer_of"), [
    ("resnet18", lambda m: m.fc),
    ("mobilenet_v3_small", lambda m: m.classifier[3]),  # Linear, Hardswish, Dropout, Linear: the last one
    ("efficientnet_b0", lambda m: m.classifier[1]),
    ("timm:tf_efficientnet_lite0", lambda m: m.classifier),
    ("timm:convnext_atto", lambda m: m.head.fc),
])
def test_the_embedding_is_the_input_of_the_models_final_layer(arch, layer_of):
    torch.manual_seed(0)
    model = build_architecture(arch, 1000).eval()
    images = torch.randn(2, 3, 160, 160)
    expected_features, expected_logits = final_layer_input_and_output(model, layer_of(model), images)
    split = split_classifier(copy.deepcopy(model), 1000)
    assert isinstance(split, SplitClassifier) and split.embedding_size == expected_features.shape[1]
    with torch.inference_mode():
        features, logits = split(images)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(logits, expected_logits)


def test_a_model_without_a_linear_head_offers_no_embedding():
    squeezenet = torchvision.models.squeezenet1_1().eval()  # its classifier is a convolution
    assert split_classifier(squeezenet, 1000) is None
    engine = InferenceEngine(make_config(), squeezenet, torch.device("cpu"))
    assert engine.output_kinds == {TOPK}
    with pytest.raises(ValueError, match="cannot give embedding"):
        engine.predict_outputs([b"x"], kinds=frozenset({EMBEDDING}))
    engine.close()


@pytest.fixture(scope="module")
def split_demo(demo_model):
    return split_classifier(copy.deepcopy(demo_model), 1000)


def test_one_forward_gives_the_same_topk_with_embeddings_and_unit_vectors(split_demo, demo_model, imagenet_photos):
    photos = [*imagenet_photos[:5], b"not an image", imagenet_photos[5]]
    engine = InferenceEngine(make_config(**DEMO_PREPROCESSING, max_batch=4), split_demo, torch.device("cpu"))
    both = engine.predict_outputs(photos, kinds=frozenset({TOPK, EMBEDDING}))
    classification = engine.predict(photos)
    plain = InferenceEngine(make_config(**DEMO_PREPROCESSING, max_batch=4), demo_model, torch.device("cpu"))
    assert plain.output_kinds == {TOPK}
    unsplit = plain.predict(photos)
    assert [result[TOPK] for result in both[:5]] == classification[:5] == unsplit[:5]
    assert both[5] == classification[5] and both[6][TOPK] == unsplit[6]
    vectors = torch.tensor([both[i][EMBEDDING] for i in (0, 1, 2, 3, 4, 6)])
    assert vectors.shape == (6, 1280)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(6))
    only = engine.predict_outputs(photos[:2], kinds=frozenset({EMBEDDING}))
    assert [set(result) for result in only] == [{EMBEDDING}, {EMBEDDING}]
    torch.testing.assert_close(torch.tensor(only[1][EMBEDDING]), vectors[1])
    engine.close()
    plain.close()


def test_embeddings_can_come_unnormalised(split_demo, imagenet_photos):
    engine = InferenceEngine(make_config(**DEMO_PREPROCESSING, embedding_normalize=False), split_demo,
                             torch.device("cpu"))
    [raw] = engine.predict_outputs(imagenet_photos[:1], kinds=frozenset({EMBEDDING}))
    vector = torch.tensor(raw[EMBEDDING])
    assert abs(float(vector.norm()) - 1.0) > 0.5  # pooled ReLU6 activations: far from unit length
    assert float(vector.min()) >= 0.0
    engine.close()
