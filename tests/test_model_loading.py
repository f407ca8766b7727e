"""handler.model without a server: device choice, loading weights safely, refusing files that do not fit,
and the archive's side files (labels, gate photos, the untrained-weights banner)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from handler.config import ConfigError
from handler.model import (
    UNTRAINED_WARNING,
    WeightsMismatch,
    check_weights_fit,
    load_labels,
    load_model,
    read_build_info,
    read_gate_images,
    read_state_dict,
    resolve_device,
    warn_if_untrained,
)
from tests.conftest import make_config

SMALL = "mobilenet_v3_small"  # a torchvision architecture with a Linear head, built in well under a second
CLASSES = 10


def fresh_architecture() -> torch.nn.Module:
    """SMALL as torchvision builds it (not conftest's ``small_model`` fixture, a ResNet-18)."""
    import torchvision

    return torchvision.models.get_model(SMALL, num_classes=CLASSES)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state_dict = fresh_architecture().state_dict()
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.save(state_dict, path)
    return path, state_dict


# --- resolve_device ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda_available", [False, True])
def test_cpu_is_the_cpu_whether_or_not_cuda_is_there(monkeypatch, cuda_available):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", gpu_id=1) == torch.device("cpu")


def test_auto_takes_the_gpu_torchserve_assigned_and_gpu_0_when_none_was(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", gpu_id=1) == torch.device("cuda", 1)
    assert resolve_device("auto", gpu_id=None) == torch.device("cuda", 0)
    assert resolve_device("cuda", gpu_id=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", gpu_id=0) == torch.device("cuda", 0)


def test_auto_without_cuda_is_the_cpu_and_cuda_without_cuda_says_what_to_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", gpu_id=1) == torch.device("cpu")
    with pytest.raises(ConfigError) as refused:
        resolve_device("cuda")
    assert str(refused.value) == "device is 'cuda' but CUDA is not available here; use device: auto or cpu"


# --- load_model ------------------------------------------------------------------------------------------------

def test_weights_load_into_the_architecture_in_eval_mode_and_fp32(small_weights):
    path, state_dict = small_weights
    model = load_model(make_config(architecture=SMALL, num_classes=CLASSES), path, torch.device("cpu"))
    assert not model.training
    loaded = model.state_dict()  # split: the final Linear is the head, the rest the body
    assert len(loaded) == len(state_dict)
    for key, tensor in state_dict.items():
        name = key.replace("classifier.3.", "head.") if key.startswith("classifier.3.") else f"body.{key}"
        assert torch.equal(loaded[name], tensor), key
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_model_is_moved_to_the_device_it_is_given(small_weights):
    path, _ = small_weights
    model = load_model(make_config(architecture=SMALL, num_classes=CLASSES), path, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_half_precision_torchscript_file_is_served_as_fp32(tmp_path):
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES)).half())
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    model = load_model(make_config(architecture="torchscript", num_classes=CLASSES), path, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, CLASSES)


class _RunsCodeWhenUnpickled:
    marker: Path

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_weights_file_that_runs_code_when_unpickled_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    payload = _RunsCodeWhenUnpickled()
    payload.marker = marker
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": payload}, path, pickle_module=pickle)
    with pytest.raises(ConfigError, match=r"(?s)the archive's weights file weights\.pt cannot be read \(.+\); "
                                          r"rebuild the archive"):
        load_model(make_config(architecture=SMALL, num_classes=CLASSES), path, torch.device("cpu"))
    assert not marker.exists()


def test_weights_of_another_shape_name_the_architecture_they_do_not_fit(small_weights, tmp_path):
    _, state_dict = small_weights
    path = tmp_path / "other.pt"
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("classifier.3.")}, path)
    with pytest.raises(WeightsMismatch, match=r"^the weights do not fit mobilenet_v3_small: 2 of its tensors"):
        load_model(make_config(architecture=SMALL, num_classes=CLASSES), path, torch.device("cpu"))


def test_a_weights_file_without_a_state_dict_is_named(tmp_path):
    path = tmp_path / "tensors.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ConfigError, match=r"^tensors\.pt must hold a state_dict \(torch\.save\(model\.state_dict\(\)"):
        load_model(make_config(architecture=SMALL, num_classes=CLASSES), path, torch.device("cpu"))


# --- read_state_dict and check_weights_fit -----------------------------------------------------------------------

def test_a_file_that_is_not_a_torch_save_names_torchs_error(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"these are not weights\nsecond line")
    with pytest.raises(WeightsMismatch) as raised:
        read_state_dict(path)
    try:
        torch.load(path, weights_only=True)
    except Exception as error:  # whatever torch raises for it is what the message must name
        first_line = str(error).strip().splitlines()[0]
        expected = f"{path} is not a state_dict saved with torch.save ({type(error).__name__}: {first_line})"
    assert str(raised.value) == expected


def test_safetensors_files_are_read(small_weights, tmp_path):
    from safetensors.torch import save_file

    _, state_dict = small_weights
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    loaded = read_state_dict(path)
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_a_zip_that_is_not_a_torch_save_is_refused_as_not_a_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "no pickle in here")
    with pytest.raises(WeightsMismatch, match=r"is not a state_dict saved with torch\.save \("):
        read_state_dict(path)


def test_a_dict_with_something_besides_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"fc.weight": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(WeightsMismatch, match=r"does not hold a state_dict: save it with torch\.save\(model\."
                                              r"state_dict\(\), path\) \(for TorchScript use --arch torchscript\)"):
        read_state_dict(path)


def test_missing_tensors_are_counted_and_the_first_is_named(small_weights):
    _, state_dict = small_weights
    partial = {k: v for k, v in state_dict.items() if not k.startswith("classifier.3.")}
    with pytest.raises(WeightsMismatch, match=r"^the weights do not fit mobilenet_v3_small: 2 of its tensors are "
                                              r"missing from the file, the first is classifier\.3\.weight "
                                              r"\(wrong --arch\?\)$"):
        check_weights_fit(fresh_architecture(), partial, SMALL)


def test_extra_tensors_are_counted_and_the_first_is_named(small_weights):
    _, state_dict = small_weights
    extra = {**state_dict, "head.weight": torch.zeros(1), "head.bias": torch.zeros(1)}
    with pytest.raises(WeightsMismatch, match=r"^the weights do not fit mobilenet_v3_small: the file has 2 tensors "
                                              r"mobilenet_v3_small does not have, the first is head\.weight "
                                              r"\(wrong --arch\?\)$"):
        check_weights_fit(fresh_architecture(), extra, SMALL)


def test_absent_batchnorm_counters_are_accepted_and_filled_in(small_weights):
    _, state_dict = small_weights
    without_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(without_counters) < len(state_dict)
    check_weights_fit(fresh_architecture(), without_counters, SMALL)
    assert set(without_counters) == set(state_dict)
    counter = next(k for k in state_dict if k.endswith("num_batches_tracked"))
    assert torch.equal(without_counters[counter], fresh_architecture().state_dict()[counter])


# --- the archive's side files -------------------------------------------------------------------------------------

def test_an_archive_without_build_info_has_none(tmp_path):
    assert read_build_info(tmp_path) == {}
    (tmp_path / "build_info.json").write_text('{"weights": {"source": "random", "seed": 3}}')
    assert read_build_info(tmp_path) == {"weights": {"source": "random", "seed": 3}}


def test_gate_photos_are_the_folders_jpegs_in_name_order(tmp_path):
    folder = tmp_path / "gate_images"
    folder.mkdir()
    for name, data in (("b.jpg", b"second"), ("a.jpg", b"first"), ("notes.txt", b"not a photo")):
        (folder / name).write_bytes(data)
    assert read_gate_images(folder) == [b"first", b"second"]
    assert read_gate_images(tmp_path / "absent") == []


def test_untrained_weights_get_a_banner_with_their_seed(caplog):
    with caplog.at_level(logging.WARNING, logger="handler.model"):
        assert warn_if_untrained({"weights": {"source": "random", "seed": 7}}) is True
    [record] = caplog.records
    assert record.getMessage() == "\n".join(["!" * 100, UNTRAINED_WARNING.format(seed=7), "!" * 100])
    assert "seed 7)" in record.getMessage()
    caplog.clear()
    assert warn_if_untrained({"weights": {"source": "file"}}) is False
    assert warn_if_untrained({}) is False
    assert caplog.records == []


def test_labels_take_torchserves_pairs_plain_names_and_fall_back_to_the_index(tmp_path):
    path = tmp_path / "index_to_name.json"
    path.write_text(json.dumps({"0": ["n01440764", "tench"], "1": "goldfish", "3": 42}))
    assert load_labels(path, 5) == ["tench", "goldfish", "2", "42", "4"]
    assert load_labels(tmp_path / "absent.json", 3) == ["0", "1", "2"]
