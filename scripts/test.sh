#!/usr/bin/env bash
# Run the whole test suite:   scripts/test.sh [pytest args]
# Same setup as serve.sh (.venv, pinned requirements), plus the test tools. Needs Java 11+ for TorchServe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-dev.txt  # explicit: pytest arguments are not for it
echo ">> ruff"
ruff check handler client scripts bench tests deploy
echo ">> pytest"
if [ $# -gt 0 ]; then
    exec python -X faulthandler -m pytest -ra "$@"
fi
# The model-step backend tests (OpenVINO and inductor loaded in-process) run in a pytest process of their own:
# with them first in one process, that process died of SIGSEGV three times, each time ~70 % into the suite as a
# test after tests/test_engine.py started a subprocess (test_gateway, then test_gpu_check); every module passes
# on its own and the suite without them passed. Cause not found yet (faulthandler printed nothing).
# That process runs beside the rest (its own temp folder; its output follows the rest's), which saves most of
# its ~100 s: the rest of the suite spends much of its time waiting on servers to start.
backends_dir=$(mktemp -d)
python -X faulthandler -m pytest -ra --basetemp "$backends_dir/tmp" tests/test_backends.py \
    > "$backends_dir/output.txt" 2>&1 &
backends_pid=$!
rest_status=0
python -X faulthandler -m pytest -ra --ignore=tests/test_backends.py || rest_status=$?
backends_status=0
wait "$backends_pid" || backends_status=$?
echo ">> tests/test_backends.py (ran beside the rest, in its own process)"
cat "$backends_dir/output.txt"
rm -rf "$backends_dir"
if [ "$rest_status" -ne 0 ] || [ "$backends_status" -ne 0 ]; then
    echo "FAILED: the suite exited $rest_status, tests/test_backends.py $backends_status" >&2
    exit 1
fi
