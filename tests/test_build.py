"""Building archives: preprocessing precedence, weights checks, clear errors, and archives never replaced silently."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import build_mar
import pytest
import torch
import torchvision
import yaml
from conftest import REPO

from handler.architectures import NativePreprocessing, build_architecture, native_preprocessing, resolve_preprocessing
from handler.config import ConfigError

TIMM_NATIVE = NativePreprocessing(
    {"crop_size": 224, "resize_size": 235, "interpolation": "bicubic", "mean": [0.1, 0.2, 0.3], "std": [0.4] * 3},
    0.95, "timm pretrained config (test)")


def values(resolved):
    return {key: setting.value for key, setting in resolved.items()}


def test_precedence_user_over_model_over_defaults():
    resolved = resolve_preprocessing({"interpolation": "bilinear", "std": [0.5] * 3}, TIMM_NATIVE)
    assert values(resolved) == {"crop_size": 224, "resize_size": 235, "interpolation": "bilinear",
                                "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    assert resolved["interpolation"].source == resolved["std"].source == "model-config.yaml"
    assert resolved["crop_size"].source == "timm pretrained config (test)"
    defaults = resolve_preprocessing({}, NativePreprocessing({}, None, "none"))
    assert values(defaults) == {"crop_size": 224, "resize_size": 256, "interpolation": "bilinear",
                                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert {setting.source for setting in defaults.values()} == {"default"}


def test_crop_pct_and_a_new_crop_size_set_the_resize():
    assert values(resolve_preprocessing({"crop_pct": 1.0, "crop_size": 288}, TIMM_NATIVE))["resize_size"] == 288
    assert values(resolve_preprocessing({"crop_pct": 0.875}, TIMM_NATIVE))["resize_size"] == 256
    # only the crop changes: the resize follows the model's crop_pct (0.95), as timm's eval transform does
    assert values(resolve_preprocessing({"crop_size": 288}, TIMM_NATIVE))["resize_size"] == 303
    assert values(resolve_preprocessing({"crop_size": 240, "resize_size": 300}, TIMM_NATIVE))["resize_size"] == 300


@pytest.mark.parametrize(("user", "message"), [
    ({"crop_pct": 0.9, "resize_size": 256}, "resize_size or crop_pct"),
    ({"crop_pct": 1.5}, "crop_pct must be a number in (0, 1]"),
    ({"interpolation": "lanczos"}, "supported: bilinear, bicubic"),
])
def test_contradictory_or_unsupported_preprocessing_is_refused(user, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        resolve_preprocessing(user, TIMM_NATIVE)


def test_each_library_states_its_own_preprocessing():
    demo = native_preprocessing("timm:tf_efficientnet_lite0", build_architecture("timm:tf_efficientnet_lite0", 1000))
    assert demo.values == {"crop_size": 224, "resize_size": 256, "interpolation": "bicubic",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    resnet = native_preprocessing("resnet50", torch.nn.Identity())
    assert (resnet.values["resize_size"], resnet.values["crop_size"]) == (232, 224)  # IMAGENET1K_V2
    assert native_preprocessing("torchscript", torch.nn.Identity()).values == {}


@pytest.mark.parametrize(("arch", "message"), [
    ("timm:resnet5000", "unknown timm model 'resnet5000'"),
    ("resnet5000", "unknown architecture 'resnet5000'"),
    ("fasterrcnn_resnet50_fpn", "unknown architecture"),  # torchvision has it, but not as a classifier
])
def test_unknown_architectures_get_a_clear_error(arch, message, tmp_path, capsys):
    assert build_mar.main(["--arch", arch, "--export-path", str(tmp_path), "--skip-step-check"]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("arch", "suggested"), [
    ("timm:convnxt_tiny", "(did you mean timm:convnext_tiny,"),
    ("resnt50", "(did you mean resnet50,"),
])
def test_a_misspelt_architecture_gets_the_names_it_was_close_to(arch, suggested, tmp_path, capsys):
    """Named in the message itself: no command to paste that would need the project's venv."""
    assert build_mar.main(["--arch", arch, "--export-path", str(tmp_path), "--skip-step-check"]) == 2
    error = capsys.readouterr().err
    assert suggested in error and "python -c" not in error


def test_a_whole_pickled_model_is_told_to_save_its_state_dict(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / "whole.pt")  # the model, not its weights
    assert build_mar.main(["--arch", "resnet18", "--weights", str(tmp_path / "whole.pt"), "--export-path",
                           str(tmp_path / "store")]) == 2
    error = capsys.readouterr().err
    assert "holds a whole pickled object (torchvision.models.resnet.ResNet), not a state_dict" in error
    assert "torch.save(model.state_dict(), 'whole.pt')" in error
    assert "weights_only" not in error and len(error.strip().splitlines()) == 1


def test_a_missing_weights_file_is_one_line_without_the_usage(tmp_path, capsys):
    assert build_mar.main(["--arch", "resnet18", "--weights", "no_such_weights.pt", "--export-path",
                           str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines() == [f"build_mar: --weights no_such_weights.pt: no such file in {Path.cwd()}"]


def test_the_handler_code_digest_covers_the_wire_format_the_archive_carries(tmp_path, monkeypatch):
    before = build_mar.handler_code_digest()
    copy = tmp_path / "image_batch_client"
    copy.mkdir()
    for name in build_mar.WIRE_FORMAT_FILES:
        (copy / name).write_bytes((build_mar.WIRE_FORMAT_PACKAGE / name).read_bytes())
    monkeypatch.setattr(build_mar, "WIRE_FORMAT_PACKAGE", copy)
    assert build_mar.handler_code_digest() == before
    (copy / "oip.py").write_text((copy / "oip.py").read_text() + "\n# changed\n")
    assert build_mar.handler_code_digest() != before


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "r18.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}},
               folder / "checkpoint.pt")
    return folder


def build_info(mar):
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read("build_info.json")), yaml.safe_load(archive.read("model-config.yaml"))


def test_an_archive_records_everything_the_handler_needs(resnet18_weights, tmp_path, capsys):
    assert build_mar.main(["--arch", "resnet18", "--weights", str(resnet18_weights / "r18.pt"), "--model-name",
                           "r18", "--export-path", str(tmp_path)]) == 0
    info, config = build_info(tmp_path / "r18.mar")
    assert config["handler"]["architecture"] == "resnet18" and config["handler"]["num_classes"] == 10
    assert (config["handler"]["resize_size"], config["handler"]["crop_size"]) == (256, 224)  # IMAGENET1K_V1's
    assert config["maxWorkers"] == yaml.safe_load((REPO / "model-config.yaml").read_text())["maxWorkers"]
    assert info["weights"]["file"] == "r18.pt" and len(info["weights"]["sha256"]) == 64
    printed = capsys.readouterr().out
    assert "num_classes    10" in printed
    # the model step chosen and checked here as the server will: printed and recorded (what build_mar.py checks is
    # the same choose_model_step the worker runs; tests/test_backends.py tests the choice itself)
    step = info["model_step"]
    assert step["backend"] in {"openvino", "inductor", "eager"} and step["precision"] == "fp32"
    assert step["checked_by"] == "build_mar.py on the build machine" and step["device"] == "cpu"
    assert f"model step: {step['backend']} fp32" in printed
    with zipfile.ZipFile(tmp_path / "r18.mar") as archive:
        code = {name for name in archive.namelist() if name.endswith(".py")}
    # the handler and, of the client package, only the wire format it imports (standard library only)
    assert {"handler/torchserve_handler.py", "image_batch_client/__init__.py", "image_batch_client/oip.py"} <= code
    assert not {name for name in code if name.startswith("image_batch_client/")} - {
        "image_batch_client/__init__.py", "image_batch_client/oip.py"}


def test_a_checkpoint_with_a_wrapped_prefixed_state_dict_is_accepted(resnet18_weights, tmp_path):
    assert build_mar.main(["--arch", "resnet18", "--weights", str(resnet18_weights / "checkpoint.pt"),
                           "--export-path", str(tmp_path), "--skip-step-check"]) == 0


def test_weights_for_another_head_size_are_refused_when_num_classes_is_fixed(resnet18_weights, tmp_path, capsys):
    assert build_mar.main(["--arch", "resnet18", "--weights", str(resnet18_weights / "r18.pt"), "--num-classes",
                           "1000", "--export-path", str(tmp_path), "--skip-step-check"]) == 2
    assert "fc.weight has shape (10, 512) in the file but (1000, 512) in resnet18" in capsys.readouterr().err


def test_an_archive_of_another_model_is_not_replaced_without_force(resnet18_weights, tmp_path, capsys):
    common = ["--model-name", "mine", "--export-path", str(tmp_path), "--skip-step-check"]
    assert build_mar.main(["--arch", "resnet18", "--weights", str(resnet18_weights / "r18.pt"), *common]) == 0
    before = (tmp_path / "mine.mar").read_bytes()
    assert build_mar.main(["--arch", "resnet34", *common]) == 2
    assert "holds another model (resnet18, weights r18.pt)" in capsys.readouterr().err
    assert (tmp_path / "mine.mar").read_bytes() == before
    assert build_mar.main(["--arch", "resnet34", "--force", *common]) == 0
    assert "replacing" in capsys.readouterr().out
    assert build_info(tmp_path / "mine.mar")[0]["architecture"] == "resnet34"


def test_if_changed_skips_an_up_to_date_archive_and_rebuilds_a_changed_one(resnet18_weights, tmp_path, capsys):
    args = ["--arch", "resnet18", "--weights", str(resnet18_weights / "r18.pt"), "--export-path", str(tmp_path),
            "--if-changed", "--skip-step-check"]
    assert build_mar.main(args) == 0
    assert build_mar.main(args) == 0
    assert "is up to date" in capsys.readouterr().out
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "model-config.yaml").read_text().replace("topk: 5", "topk: 3"))
    assert build_mar.main([*args, "--config", str(config)]) == 0
    assert "built" in capsys.readouterr().out
    assert build_info(tmp_path / "resnet18.mar")[1]["handler"]["topk"] == 3
