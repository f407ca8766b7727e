# Sourced by serve.sh and test.sh: a .venv with the pinned requirements, reinstalled only when they change.
# Usage: source scripts/setup_env.sh REQUIREMENTS_FILE   (always name it: a sourced script sees the caller's arguments)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$REPO_ROOT/${1:?name the requirements file}"
PYTHON="${PYTHON:-python3}"
# torch 2.15 and the handler need Python 3.11+; name the version instead of letting pip fail on torch==2.15.0.
python_ok() {  # python_ok INTERPRETER: true for Python 3.11 or newer
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
python_version() {
    "$1" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))' 2>/dev/null || echo "unknown"
}
if [ -x "$REPO_ROOT/.venv/bin/python" ] && ! python_ok "$REPO_ROOT/.venv/bin/python"; then
    echo ">> $REPO_ROOT/.venv was made by Python $(python_version "$REPO_ROOT/.venv/bin/python"), which is too old" \
         "(3.11+ needed): making it again"
    rm -rf "$REPO_ROOT/.venv"
fi
if [ ! -x "$REPO_ROOT/.venv/bin/python" ]; then
    if ! command -v "$PYTHON" >/dev/null; then
        echo "Python 3.11+ is needed, and $PYTHON is not on PATH: install Python 3.11 or newer, or name it with" \
             "PYTHON=/path/to/python3.11 $0" >&2
        exit 1
    fi
    if ! python_ok "$PYTHON"; then
        echo "Python 3.11+ is needed (torch 2.15, the handler), but $PYTHON is Python $(python_version "$PYTHON"):" \
             "install Python 3.11 or newer, or name it with PYTHON=/path/to/python3.11 $0" >&2
        exit 1
    fi
    echo ">> creating $REPO_ROOT/.venv with Python $(python_version "$PYTHON")" \
         "(about 6 GB once installed: torch's wheel carries ~3 GB of CUDA libraries, used on a GPU only)"
    "$PYTHON" -m venv "$REPO_ROOT/.venv"
fi
# What the install is made from: the requirement files and the client package's own (client/pyproject.toml).
pins="$(cat "$REPO_ROOT"/requirements*.txt "$REPO_ROOT/client/pyproject.toml" | sha256sum | cut -c1-16)"
stamp="$REPO_ROOT/.venv/.installed-$pins-$(basename "$requirements")"
dev_stamp="$REPO_ROOT/.venv/.installed-$pins-requirements-dev.txt"  # the dev set includes the serving set
if [ ! -f "$stamp" ] && [ ! -f "$dev_stamp" ]; then
    echo ">> installing $(basename "$requirements") into .venv (first run: a few minutes, ~6 GB)"
    "$REPO_ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
    # from the repo root: pip reads requirements.txt's "-e ./client" relative to the working directory
    (cd "$REPO_ROOT" && "$REPO_ROOT/.venv/bin/python" -m pip install --quiet -r "$requirements")
    touch "$stamp"
fi
command -v java >/dev/null || { echo "TorchServe needs Java 11+ (java not found on PATH)" >&2; exit 1; }
export PATH="$REPO_ROOT/.venv/bin:$PATH"
