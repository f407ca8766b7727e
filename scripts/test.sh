#!/usr/bin/env bash
# Run the whole test suite:   scripts/test.sh [pytest args]
# Same setup as serve.sh (.venv, pinned requirements), plus the test tools. Needs Java 11+ for TorchServe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-dev.txt  # explicit: pytest arguments are not for it
echo ">> ruff"
ruff check handler scripts tests deploy
echo ">> pytest"
python -X faulthandler -m pytest -ra "$@"  # faulthandler: a crash of native code prints every thread's Python stack
