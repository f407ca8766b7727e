# Sourced by serve.sh and test.sh: a .venv with the pinned requirements, reinstalled only when they change.
# Usage: source scripts/setup_env.sh REQUIREMENTS_FILE   (always name it: a sourced script sees the caller's arguments)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$REPO_ROOT/${1:?name the requirements file}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$REPO_ROOT/.venv/bin/python" ]; then
    echo ">> creating $REPO_ROOT/.venv"
    "$PYTHON" -m venv "$REPO_ROOT/.venv"
fi
pins="$(cat "$REPO_ROOT"/requirements*.txt | sha256sum | cut -c1-16)"
stamp="$REPO_ROOT/.venv/.installed-$pins-$(basename "$requirements")"
dev_stamp="$REPO_ROOT/.venv/.installed-$pins-requirements-dev.txt"  # the dev set includes the serving set
if [ ! -f "$stamp" ] && [ ! -f "$dev_stamp" ]; then
    echo ">> installing $(basename "$requirements") into .venv (first run: about a minute)"
    "$REPO_ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$REPO_ROOT/.venv/bin/python" -m pip install --quiet -r "$requirements"
    touch "$stamp"
fi
command -v java >/dev/null || { echo "TorchServe needs Java 11+ (java not found on PATH)" >&2; exit 1; }
export PATH="$REPO_ROOT/.venv/bin:$PATH"
