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
# Two chains of pytest processes run side by side (the suite spends much of its time waiting on servers and
# subprocesses: about a third of two cores sat idle in one process). Each has its own temp folder and servers;
# the photo corpus and samples they share are made first. The model-step backend tests (OpenVINO and inductor
# loaded in-process) run in a process of their own: with them first in one process with the rest, that process
# died of SIGSEGV three times, each time ~70 % into the suite as a test after tests/test_engine.py started a
# subprocess (test_gateway, then test_gpu_check); every module passes on its own. Cause not found yet.
python - <<'PY'
from pathlib import Path
import sys
sys.path.insert(0, "scripts")
from make_corpus import write_corpus, write_samples
write_corpus(Path(".cache/corpus"))
write_samples(Path("samples"))
PY
second_chain=(tests/test_benchmarks.py tests/test_image.py tests/test_models.py tests/test_build.py
              tests/test_gpu_check.py tests/test_client_package.py)
side_dir=$(mktemp -d)
echo ">> beside these: tests/test_backends.py, then ${second_chain[*]} (their output follows at the end)"
(
    status=0
    side_pytest=(python -X faulthandler -m pytest -ra -p no:cacheprovider)  # one process writes .pytest_cache
    "${side_pytest[@]}" --basetemp "$side_dir/backends" tests/test_backends.py || status=1
    "${side_pytest[@]}" --basetemp "$side_dir/second" "${second_chain[@]}" || status=1
    exit $status
) > "$side_dir/output.txt" 2>&1 &
side_pid=$!
first_status=0
python -X faulthandler -m pytest -ra --ignore=tests/test_backends.py \
    $(printf -- '--ignore=%s ' "${second_chain[@]}") || first_status=$?
side_status=0
wait "$side_pid" || side_status=$?
echo ">> tests/test_backends.py, then ${second_chain[*]} (ran beside the rest)"
cat "$side_dir/output.txt"
rm -rf "$side_dir"
if [ "$first_status" -ne 0 ] || [ "$side_status" -ne 0 ]; then
    echo "FAILED: some tests failed (see above): the first chain exited $first_status, the second $side_status" >&2
    exit 1
fi
