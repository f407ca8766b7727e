"""The model step's backends and its accuracy gate, on the trained demo model and real photos.

References here are computed with the plain eager module and torch's own softmax, not with handler code.
"""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np
import pytest
import torch
import torch._inductor.config

from handler.backends import (
    EXACT_TOLERANCE,
    REDUCED_TOLERANCE,
    choose_model_step,
    cpu_flags,
    has_native_bf16,
    inductor_step,
    openvino_step,
    resolve_precision,
)
from handler.codecs import EMBEDDING, TOPK
from handler.config import ConfigError
from handler.engine import InferenceEngine
from handler.outputs import split_classifier
from tests.conftest import DEMO_PREPROCESSING, make_config

CPU = torch.device("cpu")
BF16_CPU = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})  # a Xeon with AMX, forced
PLAIN_CPU = frozenset({"avx2", "fma"})  # an AMD EPYC without bf16, forced


def demo_config(tmp_path, **overrides):
    return make_config(**{**DEMO_PREPROCESSING, "max_batch": 8, "cache_dir": str(tmp_path), **overrides})


@pytest.fixture(scope="module")
def split_demo(demo_model):
    """The demo split into features and logits, on a copy: split_classifier takes the head out in place, and
    demo_model is shared with other test modules."""
    return split_classifier(copy.deepcopy(demo_model), 1000)


@pytest.fixture(scope="module")
def photos(imagenet_photos):
    return imagenet_photos[:20]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One conversion cache for the module: the demo is converted to OpenVINO IR once."""
    return tmp_path_factory.mktemp("model_step_cache")


@pytest.fixture(scope="module")
def reference(split_demo, photos, tmp_path_factory):
    """Eager fp32 probabilities and features of the photos, through the engine's preprocessing only."""
    engine = InferenceEngine(demo_config(tmp_path_factory.mktemp("ref")), split_demo, CPU)
    images = engine.normalized(photos).contiguous()
    engine.close()
    with torch.inference_mode():
        features = split_demo.body(images).flatten(1)
        probabilities = torch.softmax(split_demo.head(features), dim=1)
    return probabilities, features


def served(engine, photos):
    results = engine.predict_outputs(photos, topk=5, kinds=frozenset({TOPK, EMBEDDING}))
    assert all(isinstance(result, dict) for result in results)
    return results


def assert_matches_reference(results, reference, tolerance, min_cosine):
    probabilities, features = reference
    for index, result in enumerate(results):
        top = result[TOPK]
        expected = torch.topk(probabilities[index], 5)
        assert top[0][0] == expected.indices[0].item()
        for class_index, score in top:
            assert abs(score - probabilities[index, class_index].item()) <= tolerance
        embedding = np.asarray(result[EMBEDDING])
        reference_embedding = torch.nn.functional.normalize(features[index], dim=0).numpy()
        assert float(embedding @ reference_embedding) >= min_cosine


# --- Which precision, on which CPU --------------------------------------------------------------------------


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_natively():
    assert has_native_bf16(BF16_CPU) and has_native_bf16(frozenset({"avx512_bf16"}))
    assert not has_native_bf16(PLAIN_CPU)
    assert resolve_precision("auto", CPU, BF16_CPU) == "bf16"
    assert resolve_precision("auto", CPU, PLAIN_CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0), PLAIN_CPU) == "fp16"
    assert resolve_precision("bf16", CPU, PLAIN_CPU) == "bf16"  # asked for by name: served if it passes the gate
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU, BF16_CPU)


# --- Every backend against eager fp32 -----------------------------------------------------------------------


def test_openvino_fp32_gives_eager_answers_and_embeddings(split_demo, photos, reference, cache_dir):
    step = openvino_step(split_demo, "fp32", 224, 2, cache_dir, "demo")
    assert (step.backend, step.precision, step.static_shapes) == ("openvino", "fp32", False)
    engine = InferenceEngine(demo_config(cache_dir), split_demo, CPU, step=step)
    engine.warm_up()
    assert_matches_reference(served(engine, photos), reference, EXACT_TOLERANCE, 0.9999)
    engine.close()


def test_openvino_reads_its_converted_model_from_the_cache_the_second_time(tmp_path):
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 10)).eval()
    first = openvino_step(tiny, "fp32", 64, 2, tmp_path, "tiny")
    second = openvino_step(tiny, "fp32", 64, 2, tmp_path, "tiny")
    assert any("converted and saved" in note for note in first.notes)
    assert any("IR read from" in note for note in second.notes)
    assert sorted(path.suffix for path in (tmp_path / "openvino").glob("tiny-*")) == [".bin", ".xml"]
    images = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(first(images), second(images))


def test_inductor_fp32_gives_eager_answers_and_embeddings_and_compiles_only_at_warm_up(
        split_demo, photos, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    step = inductor_step(split_demo, "fp32", tmp_path)
    engine = InferenceEngine(demo_config(tmp_path, batch_buckets=(8,)), split_demo, CPU, step=step)
    assert engine.buckets == (8,)
    engine.warm_up()
    built = step.graphs_built()
    assert built == 1
    results = served(engine, photos)  # 20 photos: chunks of 8, 8 and 4 (padded to 8)
    engine.predict(photos[:3])
    assert step.graphs_built() == built  # no compilation on a request's path
    assert_matches_reference(results, reference, EXACT_TOLERANCE, 0.9999)
    engine.close()


# bf16 without native support (this project's AMD machines) is emulated and slow: few photos in these tests, in
# NCHW (emulated bf16 is slower still in channels_last).
BF16_PHOTOS = 4


def test_a_bf16_step_computes_in_bf16_on_its_own_copy_of_the_model(split_demo, photos, reference, tmp_path):
    engine = InferenceEngine(demo_config(tmp_path, precision="bf16", channels_last=False), split_demo, CPU)
    assert engine.step.describe() == "eager bf16"
    results = served(engine, photos[:BF16_PHOTOS])
    engine.close()
    probabilities = reference[0]
    shifts = [abs(score - probabilities[i, c].item()) for i, result in enumerate(results) for c, score in result[TOPK]]
    assert EXACT_TOLERANCE < max(shifts) < 0.2  # bf16's rounding shows, and stays small
    assert next(split_demo.parameters()).dtype == torch.float32  # fp32 model untouched


# --- The gate ---------------------------------------------------------------------------------------------


def gate_images(split_demo, photos, tmp_path):
    engine = InferenceEngine(demo_config(tmp_path), split_demo, CPU)
    images = engine.normalized(photos)
    engine.close()
    return images


def test_the_gate_serves_bf16_on_a_forced_bf16_cpu_when_it_agrees(split_demo, photos, reference, tmp_path):
    """On the photos the model is sure of (top-1 ahead of the second by 0.3), bf16 agrees and serves."""
    best_two = reference[0].topk(2, dim=1).values
    sure = [photo for photo, (first, second) in zip(photos, best_two.tolist(), strict=True) if first - second > 0.3]
    assert len(sure) >= BF16_PHOTOS
    sure = sure[:BF16_PHOTOS]
    config = demo_config(tmp_path, backend="eager", channels_last=False)
    step, choice = choose_model_step(config, split_demo, CPU, gate_images(split_demo, sure, tmp_path), "demo",
                                     flags=BF16_CPU)
    assert (step.describe(), choice.native_bf16) == ("eager bf16", True)
    assert choice.agreement.top1 == 1.0 and 0 < choice.agreement.max_top5_shift <= REDUCED_TOLERANCE
    assert choice.agreement.images == len(sure)


def test_the_gate_refuses_bf16_for_the_demo_on_the_photos_bf16_flips(split_demo, imagenet_photos, tmp_path,
                                                                    caplog):
    """The demo's least certain photos (its two best classes closest): bf16 rounding swaps their top-1."""
    every = gate_images(split_demo, imagenet_photos, tmp_path)
    with torch.inference_mode():
        best_two = torch.softmax(split_demo(every)[1], dim=1).topk(2, dim=1).values
        closest = (best_two[:, 0] - best_two[:, 1]).argsort()[:BF16_PHOTOS]
        images = every[closest]
        exact = torch.softmax(split_demo(images)[1], dim=1)
        reduced = torch.softmax(copy.deepcopy(split_demo).bfloat16()(images.bfloat16())[1].float(), dim=1)
    assert (exact.argmax(1) != reduced.argmax(1)).any()  # what the gate has to catch, measured with torch alone
    caplog.set_level(logging.WARNING)
    step, choice = choose_model_step(demo_config(tmp_path, backend="eager", channels_last=False), split_demo, CPU,
                                     images, "demo", flags=BF16_CPU)
    assert step.describe() == "eager fp32"
    assert len(choice.rejected) == 1 and choice.rejected[0].startswith("eager bf16: top-1 agreement ")
    assert "(allowed: top-1 100 %, shift <= 0.05)" in choice.rejected[0]
    assert "refused by its accuracy gate" in caplog.text


def test_without_gate_photos_reduced_precision_is_not_served(split_demo, tmp_path):
    step, choice = choose_model_step(demo_config(tmp_path, backend="eager", precision="bf16"), split_demo, CPU,
                                     None, "demo", flags=BF16_CPU)
    assert step.describe() == "eager fp32"
    assert "no gate photos" in choice.rejected[0]


def test_auto_serves_openvino_fp32_on_a_cpu_without_bf16(split_demo, photos, cache_dir):
    step, choice = choose_model_step(demo_config(cache_dir), split_demo, CPU,
                                     gate_images(split_demo, photos, cache_dir), "demo", flags=PLAIN_CPU)
    assert (step.backend, step.precision, choice.rejected) == ("openvino", "fp32", [])
    assert choice.agreement.top1 == 1.0 and choice.agreement.max_top5_shift <= EXACT_TOLERANCE
    assert "openvino fp32" in choice.describe() and "native bf16: no" in choice.describe()


# --- Fallback ---------------------------------------------------------------------------------------------


def test_a_missing_openvino_falls_back_to_eager_with_the_reason(split_demo, photos, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    caplog.set_level(logging.WARNING)
    step, choice = choose_model_step(demo_config(tmp_path, backend="openvino"), split_demo, CPU,
                                     gate_images(split_demo, photos, tmp_path), "demo", flags=PLAIN_CPU)
    assert step.describe() == "eager fp32"
    assert choice.rejected == ["openvino fp32: ModuleNotFoundError: import of openvino halted; None in sys.modules"]
    assert "backend openvino (fp32) failed; trying the next one" in caplog.text


def test_inductor_without_a_cpp_compiler_falls_back_to_eager(split_demo, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tiny_gate = gate_images(split_demo, photos[:4], tmp_path)
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kw: compiled.append(args) or real_compile(*args, **kw))
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # no C++ compiler to be found
        step, choice = choose_model_step(demo_config(tmp_path, backend="inductor", max_batch=4), split_demo, CPU,
                                         tiny_gate, "demo", flags=PLAIN_CPU)
    assert step.describe() == "eager fp32"
    assert len(choice.rejected) == 1 and choice.rejected[0].startswith("inductor fp32: ")
    assert "No working C++ compiler found" in choice.rejected[0] and "/nonexistent/c++" in choice.rejected[0]
    assert compiled == []  # refused before torch.compile traced the model (~17 s for the demo)


def test_openvino_is_refused_on_cuda_by_name(split_demo, tmp_path):
    with pytest.raises(ConfigError, match="openvino runs on the CPU only"):
        choose_model_step(demo_config(tmp_path, backend="openvino"), split_demo, torch.device("cuda", 0), None,
                          "demo", flags=PLAIN_CPU, builders={})
