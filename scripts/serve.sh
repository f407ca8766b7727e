#!/usr/bin/env bash
# Serve the demo model:   scripts/serve.sh
# Serve your own model:   scripts/serve.sh --arch NAME --weights FILE [--model-name NAME] [--labels FILE]
# Stop it:                scripts/serve.sh stop
# Sets up .venv, then scripts/serve.py builds the archive when needed, (re)starts TorchServe from the repo
# root (so key_file.json lands here), waits until the model answers and prints a ready curl.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt  # explicit: this script's own arguments are not for it
exec python scripts/serve.py "$@"
