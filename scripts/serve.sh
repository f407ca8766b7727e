#!/usr/bin/env bash
# Serve the demo model:   scripts/serve.sh [--weights FILE | --download]
# Stop it:                scripts/serve.sh stop
# Sets up .venv, builds model_store/resnet50.mar when missing or out of date, starts TorchServe from
# the repo root (so key_file.json lands here), waits until the model answers, prints a ready curl.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt  # explicit: this script's own arguments are not for it

if [ "${1:-}" = "stop" ]; then
    torchserve --stop || true
    exit 0
fi

mar=model_store/resnet50.mar
if [ "$#" -gt 0 ] || [ ! -f "$mar" ] || [ -n "$(find handler model-config.yaml -newer "$mar" -name '*.py' -o -newer "$mar" -name '*.yaml' | head -1)" ]; then
    if python scripts/wait_ready.py --quiet --timeout 1 >/dev/null 2>&1; then
        echo ">> the archive changes: stopping the running TorchServe first"
        torchserve --stop
        sleep 3
    fi
    echo ">> building $mar"
    python scripts/build_mar.py "$@"
fi
python scripts/make_corpus.py --out .cache/samples --imagenet 4 --phone 0 >/dev/null

if ! python scripts/wait_ready.py --quiet --timeout 1 >/dev/null 2>&1; then
    echo ">> starting TorchServe (logs in ./logs)"
    mkdir -p logs
    if ! torchserve --start --ts-config config.properties --model-store model_store --ncs >logs/torchserve.out 2>&1; then
        echo "TorchServe did not start:" >&2
        cat logs/torchserve.out >&2
        exit 1
    fi
fi
python scripts/wait_ready.py --timeout 300 --sample .cache/samples/imagenet/imagenet_000.jpg
