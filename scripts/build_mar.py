#!/usr/bin/env python3
"""Build model_store/<name>.mar: our handler, a torchvision architecture and its weights.

Weights, in order of preference:
  --weights FILE   your state_dict (torch.save(model.state_dict(), FILE))
  --download       torchvision's pretrained weights (needs internet access)
  (neither)        a seeded random initialisation: the archive works, predictions are meaningless,
                   and the server says so loudly at start-up.

--stock builds TorchServe's stock image_classifier archive from the same weights, for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torchvision  # noqa: E402

from handler.model import LABELS_FILE, UNTRAINED_WARNING, WEIGHTS_INFO_FILE, random_state_dict  # noqa: E402

STOCK_MODEL_SOURCE = '''\
import torchvision


class StockResNet50(torchvision.models.ResNet):
    def __init__(self):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])
'''


def imagenet_labels() -> dict[str, str]:
    """ImageNet class names bundled with torchvision (no download)."""
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    return {str(index): name for index, name in enumerate(categories)}


def obtain_weights(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    if args.weights:
        state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
        return state_dict, {"source": "file", "path": str(Path(args.weights).name)}
    if args.download:
        weights = torchvision.models.get_model_weights(args.arch).DEFAULT
        model = torchvision.models.get_model(args.arch, weights=weights)
        return model.state_dict(), {"source": "torchvision", "weights": str(weights)}
    print("WARNING: " + UNTRAINED_WARNING.format(seed=args.seed), file=sys.stderr)
    return random_state_dict(args.arch, 1000, args.seed), {"source": "random", "seed": args.seed}


def archive(name: str, serialized: Path, handler: str, extra: list[Path], config: Path | None,
            export: Path, model_file: Path | None = None) -> Path:
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="a state_dict file for the architecture")
    source.add_argument("--download", action="store_true", help="torchvision's pretrained weights (online)")
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (default resnet50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--model-name", default="resnet50")
    parser.add_argument("--config", type=Path, default=REPO / "model-config.yaml")
    parser.add_argument("--export-path", type=Path, default=REPO / "model_store")
    parser.add_argument("--labels", type=Path, help="index_to_name.json (default: ImageNet names)")
    parser.add_argument("--stock", action="store_true",
                        help="also build <name>_stock.mar with TorchServe's image_classifier handler")
    args = parser.parse_args()

    args.export_path.mkdir(parents=True, exist_ok=True)
    state_dict, info = obtain_weights(args)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        weights_path = stage / f"{args.model_name}.pt"
        torch.save(state_dict, weights_path)
        labels_path = stage / LABELS_FILE
        if args.labels:
            shutil.copy(args.labels, labels_path)
        else:
            labels_path.write_text(json.dumps(imagenet_labels()))
        info_path = stage / WEIGHTS_INFO_FILE
        info_path.write_text(json.dumps(info))
        # torch-model-archiver copies a directory's *contents*: stage handler/ one level down.
        package_root = stage / "package"
        shutil.copytree(REPO / "handler", package_root / "handler",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        built = archive(args.model_name, weights_path, str(REPO / "handler" / "torchserve_handler.py"),
                        [package_root, labels_path, info_path], args.config, args.export_path)
        print(f"built {built} (weights: {info['source']})")

        if args.stock:
            if args.arch != "resnet50":
                parser.error("--stock builds a ResNet-50 baseline only")
            model_file = stage / "stock_model.py"
            model_file.write_text(STOCK_MODEL_SOURCE)
            stock_config = stage / "stock-config.yaml"
            stock_config.write_text(stock_model_config(args.config))
            built = archive(f"{args.model_name}_stock", weights_path, "image_classifier",
                            [labels_path], stock_config, args.export_path, model_file)
            print(f"built {built} (stock image_classifier, same weights)")


def stock_model_config(config: Path) -> str:
    """The frontend settings of our model-config.yaml without our handler section."""
    import yaml

    settings = yaml.safe_load(config.read_text()) or {}
    settings.pop("handler", None)
    return yaml.safe_dump(settings)


if __name__ == "__main__":
    main()
