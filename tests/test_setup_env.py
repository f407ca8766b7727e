"""scripts/setup_env.sh (sourced by serve.sh and test.sh) in a copy of the repo's set-up files, with stand-in Python
interpreters: it names the Python version it refuses, makes again a .venv an older Python made, says how big .venv
gets before it installs, and installs again when the client package's pyproject.toml changes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

# A stand-in for a Python interpreter: answers setup_env.sh's version checks as Python VERSION would, makes a venv of
# itself, and records every other call (pip) instead of running it.
FAKE_PYTHON = """#!/usr/bin/env bash
version={version}
if [ "$1" = "-c" ]; then
    case "$2" in
        *"sys.exit(sys.version_info < (3, 11))"*) [ "${{version%.*}}" = "3.10" ] && exit 1 || exit 0 ;;
        *) echo "$version"; exit 0 ;;
    esac
fi
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
echo "$*" >> "$(dirname "$0")/calls.log"
"""


def fake_python(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python3"
    path.write_text(FAKE_PYTHON.format(version=version))
    path.chmod(0o755)
    return path


@pytest.fixture
def checkout(tmp_path):
    """The files setup_env.sh reads, laid out as in the repository."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "client").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", root / "scripts")
    for requirements in REPO.glob("requirements*.txt"):
        shutil.copy(requirements, root)
    shutil.copy(REPO / "client" / "pyproject.toml", root / "client")
    return root


def set_up(root: Path, python_folder: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{python_folder}{os.pathsep}{os.environ['PATH']}"  # java stays reachable
    return subprocess.run(["bash", "-c", "source scripts/setup_env.sh requirements.txt"], cwd=root,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path, **env})


def test_python_310_is_refused_by_name_before_anything_is_made(checkout, tmp_path):
    done = set_up(checkout, fake_python(tmp_path / "py310", "3.10.13").parent)
    assert done.returncode == 1
    assert "Python 3.11+ is needed" in done.stderr and "is Python 3.10.13" in done.stderr
    assert "PYTHON=/path/to/python3.11" in done.stderr
    assert not (checkout / ".venv").exists() and "installing" not in done.stdout


def test_a_venv_an_older_python_made_is_made_again(checkout, tmp_path):
    fake_python(checkout / ".venv" / "bin", "3.10.13").rename(checkout / ".venv" / "bin" / "python")
    python311 = fake_python(tmp_path / "py311", "3.11.7")
    done = set_up(checkout, tmp_path / "empty", PYTHON=str(python311))
    assert done.returncode == 0, done.stderr
    assert "was made by Python 3.10.13, which is too old (3.11+ needed): making it again" in done.stdout
    assert "version=3.11.7" in (checkout / ".venv" / "bin" / "python").read_text()
    assert "-m pip install --quiet -r" in (checkout / ".venv" / "bin" / "calls.log").read_text()


def test_the_size_of_the_venv_is_said_before_it_is_made(checkout, tmp_path):
    done = set_up(checkout, fake_python(tmp_path / "py311", "3.11.7").parent)
    assert done.returncode == 0, done.stderr
    first_line = done.stdout.splitlines()[0]
    assert first_line.startswith(">> creating") and "about 6 GB" in first_line


def test_a_change_to_the_client_packages_pyproject_installs_again(checkout, tmp_path):
    python_folder = fake_python(tmp_path / "py311", "3.11.7").parent
    assert "installing requirements.txt" in set_up(checkout, python_folder).stdout
    assert "installing" not in set_up(checkout, python_folder).stdout
    pyproject = checkout / "client" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"requests>=2.28"', '"requests>=2.28", "pillow"'))
    assert "installing requirements.txt" in set_up(checkout, python_folder).stdout
