"""Check that the installed packages are exactly the versions a requirements file pins, and consistent.

The image build runs it after pip (deploy/image/Dockerfile), and tests/test_image.py runs it in a fresh venv made
from the same file, so "the image installs the pinned set" is checked the same way in both places.
    python check_pins.py requirements-serve.txt
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> version for every line of the file; any line that is not an exact pin is an error."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        if not match:
            raise ValueError(f"{path.name}:{number}: {line!r} is not an exact pin (name==version)")
        name = canonical(match.group(1))
        if name in pins:
            raise ValueError(f"{path.name}:{number}: {name} is pinned twice")
        pins[name] = match.group(3)
    return pins


def public_version(version: str) -> str:
    """2.15.0+cpu -> 2.15.0: a pin without a local label matches any local build of that version (PEP 440)."""
    return version.split("+", 1)[0]


def drift(pins: dict[str, str]) -> list[str]:
    problems = []
    for name, wanted in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned {wanted}, not installed")
            continue
        if public_version(installed) != wanted:
            problems.append(f"{name}: pinned {wanted}, installed {installed}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    problems = drift(read_pins(Path(argv[0])))
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        problems.append("pip check: " + check.stdout.strip())
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"all {len(read_pins(Path(argv[0])))} pins of {argv[0]} installed exactly; pip check passes")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
