#!/usr/bin/env python3
"""The bookkeeping half of tests/mutation/mutation.sh (run from the repository root, in .venv).

  select SPEC...   print the names of the mutants to run, one a line
  report SPEC...   write report.md and report.json from mutmut's results under mutants/

A SPEC is a handler module name, optionally with a sample size: ``engine:4`` is a fixed 1-in-4 sample
of engine's mutants (chosen by a hash of each mutant's name, so every run draws the same sample of
the same code). A module's score is killed / (total - equivalent) over the mutants run for it.

Known equivalent mutants come from tests/mutation/mutation_equivalent.txt. An entry names a function and a
fingerprint of the mutation (its diff's - and + lines), not mutmut's mutant number: numbers shift
whenever the function changes, the fingerprint only when the mutated code itself does.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import importlib.metadata
import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import get_mutant_name

CLASS_SEPARATOR = "ǁ"
HUNK = re.compile(r"^@@ -(\d+)")
# mutmut's statuses, folded into the report's columns; any other status counts as suspicious
COLUMN_BY_STATUS = {"killed": "killed", "survived": "survived", "timeout": "timeout", "no tests": "no_tests",
                    "not checked": "not_checked", "equivalent": "equivalent"}
COUNTED = ("total", "killed", "survived", "timeout", "suspicious", "no_tests", "equivalent", "not_checked")
NOT_LISTED = ("killed", "not checked")


@dataclass(frozen=True)
class Spec:
    module: str
    sample: int = 1  # 1 in how many mutants is run

    @classmethod
    def parse(cls, text: str) -> Spec:
        module, _, sample = text.partition(":")
        if not (Path("handler") / f"{module}.py").is_file() or (sample and not sample.isdigit()) or sample == "0":
            raise SystemExit(f"not a module spec: {text!r} (expected e.g. imaging, or engine:4 for a 1-in-4 sample)")
        return cls(module, int(sample or 1))

    @property
    def path(self) -> Path:
        return Path("handler") / f"{self.module}.py"

    def in_sample(self, mutant: str) -> bool:
        return self.sample == 1 or int(hashlib.sha256(mutant.encode()).hexdigest()[:8], 16) % self.sample == 0

    def mutant_names(self) -> list[str]:
        """Every mutant mutmut makes of this module (the same names it gives them), in its order."""
        mutated = mutate_file_contents(str(self.path), self.path.read_text())
        return [get_mutant_name(self.path, name) for name in mutated.mutant_names]

    def results(self) -> dict[str, int | None]:
        """mutmut's exit code per mutant so far (None: not run); empty before the first run."""
        meta = Path("mutants") / f"{self.path}.meta"
        return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


@dataclass
class Mutant:
    name: str
    status: str
    line: int | None
    diff: str
    fingerprint: str
    reason: str = ""

    @property
    def function(self) -> str:
        return self.name.partition("__mutmut_")[0]


@dataclass
class ModuleResult:
    module: str
    sample: int
    population: int
    total: int = 0
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    suspicious: int = 0
    no_tests: int = 0
    not_checked: int = 0
    equivalent: int = 0
    mutants: list[Mutant] = field(default_factory=list)
    outside_sample: list[Mutant] = field(default_factory=list)  # run earlier, not in the score

    @property
    def score(self) -> float | None:
        scored = self.total - self.equivalent
        return self.killed / scored if scored else None


def fingerprint(diff: str) -> str:
    """8 hex digits from the changed lines only (no line numbers, no context, no indentation)."""
    changed = [line[0] + line[1:].strip() for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return hashlib.sha256("\n".join(changed).encode()).hexdigest()[:8]


def function_start_lines(source: str) -> dict[str, int]:
    """mutmut's function key (x_name, xǁClassǁname) -> first line of its text (decorators included)."""
    starts: dict[str, int] = {}

    def first_line(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        return min([node.lineno, *(d.lineno for d in node.decorator_list)])

    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            starts[f"x_{node.name}"] = first_line(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    starts[f"x{CLASS_SEPARATOR}{node.name}{CLASS_SEPARATOR}{item.name}"] = first_line(item)
    return starts


def mutated_line(diff: str, function_start: int | None, source_lines: list[str]) -> int | None:
    """The source line of the first removed line: its hunk offset in the function, checked against the file."""
    if function_start is None:
        return None
    offset = None
    for line in diff.splitlines():
        match = HUNK.match(line)
        if match:
            offset = int(match.group(1))
        elif offset is None or line.startswith(("---", "+++")):
            continue
        elif line.startswith("-"):
            number = function_start + offset - 1
            if 0 < number <= len(source_lines) and source_lines[number - 1].strip() == line[1:].strip():
                return number
            return None
        elif not line.startswith("+"):
            offset += 1
    return None


def read_equivalents(path: Path) -> dict[tuple[str, str], str]:
    """(function, fingerprint) -> reason, from the committed file (comments and blank lines skipped)."""
    entries: dict[tuple[str, str], str] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise SystemExit(f"{path}:{number}: expected '<function> <8-hex fingerprint> <reason>', got {raw!r}")
        entries[(parts[0], parts[1])] = parts[2]
    return entries


def collect(spec: Spec, equivalents: dict[tuple[str, str], str]) -> ModuleResult:
    source = spec.path.read_text()
    starts = function_start_lines(source)
    lines = source.splitlines()
    results = spec.results()
    result = ModuleResult(spec.module, spec.sample, population=len(results))
    for name, exit_code in results.items():
        status = status_by_exit_code[exit_code]
        sampled = spec.in_sample(name)
        if not sampled and status in NOT_LISTED:
            continue
        diff = get_diff_for_mutant(name, path=spec.path)
        function_key = name.rpartition(".")[2].partition("__mutmut_")[0]
        mutant = Mutant(name, status, mutated_line(diff, starts.get(function_key), lines), diff, fingerprint(diff))
        reason = equivalents.get((mutant.function, mutant.fingerprint))
        if reason is not None and status in ("survived", "no tests"):
            mutant.status, mutant.reason = "equivalent", reason
        elif reason is not None:
            mutant.reason = f"listed as equivalent, but {status}: remove the entry ({reason})"
        if not sampled:
            result.outside_sample.append(mutant)
            continue
        result.mutants.append(mutant)
        result.total += 1
        column = COLUMN_BY_STATUS.get(mutant.status, "suspicious")
        setattr(result, column, getattr(result, column) + 1)
    for mutants in (result.mutants, result.outside_sample):
        mutants.sort(key=lambda m: (m.line or 0, m.function, int(m.name.rpartition("_")[2])))
    return result


def stale_entries(equivalents: dict[tuple[str, str], str], results: list[ModuleResult]) -> list[str]:
    """Entries for the modules run that matched no mutant (their code changed, or the mutant was killed)."""
    prefixes = tuple(f"handler.{r.module}." for r in results if r.sample == 1)
    matched = {(m.function, m.fingerprint) for r in results for m in r.mutants if m.status == "equivalent"}
    return [f"{function} {digest}  {reason}" for (function, digest), reason in equivalents.items()
            if function.startswith(prefixes) and (function, digest) not in matched]


def _mutant_lines(m: Mutant) -> list[str]:
    out = [f"- `{m.name}` ({m.status}, line {m.line or '?'})" + (f": {m.reason}" if m.reason else "")]
    if m.status in ("survived", "no tests"):
        out.append(f"  equivalent entry: `{m.function} {m.fingerprint} <reason>`")
    return [*out, "", "  ```diff", *(f"  {d}" for d in m.diff.splitlines()[2:]), "  ```", ""]


def markdown(results: list[ModuleResult], stale: list[str], wall_seconds: float | None, commit: str) -> str:
    when = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    wall = f"; wall time {wall_seconds / 60:.1f} min" if wall_seconds is not None else ""
    out = ["# Mutation testing report", "",
           f"mutmut {importlib.metadata.version('mutmut')} on handler/, unit tests only; commit {commit}; {when}{wall}",
           "",
           "score = killed / (total - equivalent); timeouts, suspicious and no-tests mutants count as not killed.",
           "", "| module | mutants | killed | survived | timeout | suspicious | no tests | equivalent | score |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        score = f"{r.score:.1%}" if r.score is not None else "-"
        name = r.module if r.sample == 1 else f"{r.module} (1 in {r.sample} of {r.population})"
        out.append(f"| {name} | {r.total} | {r.killed} | {r.survived} | {r.timeout} | {r.suspicious} "
                   f"| {r.no_tests} | {r.equivalent} | {score} |")
    if any(r.not_checked for r in results):
        out += ["", "**Incomplete:** some mutants were not run (interrupted?): "
                    "`tests/mutation/mutation.sh --resume ...`."]
    if stale:
        out += ["", "## Stale equivalent entries (they match no mutant that survived: fix or remove them)", ""]
        out += [f"- `{entry}`" for entry in stale]
    for r in results:
        out += ["", f"## handler/{r.module}.py", ""]
        groups = (("Surviving mutants", [m for m in r.mutants if m.status == "survived"]),
                  ("Timeouts, suspicious, no tests",
                   [m for m in r.mutants if m.status not in ("killed", "survived", "equivalent", "not checked")]),
                  ("Known equivalent (excluded from the score)", [m for m in r.mutants if m.status == "equivalent"]),
                  ("Outside the sample, from an earlier run (not in the score)", r.outside_sample))
        for title, mutants in groups:
            if mutants:
                out += [f"### {title} ({len(mutants)})", ""]
                for m in mutants:
                    out += _mutant_lines(m)
    return "\n".join(out) + "\n"


def report(specs: list[Spec], out: Path, equivalent_file: Path, wall_seconds: float | None) -> None:
    equivalents = read_equivalents(equivalent_file)
    results = [collect(spec, equivalents) for spec in specs]
    stale = stale_entries(equivalents, results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = markdown(results, stale, wall_seconds, commit or "?")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    summary = {
        "commit": commit, "wall_seconds": wall_seconds, "stale_equivalent_entries": stale,
        "modules": {r.module: {**{name: getattr(r, name) for name in ("sample", "population", *COUNTED)},
                               "score": r.score,
                               "mutants": [asdict(m) for m in r.mutants if m.status != "killed"],
                               "outside_sample": [asdict(m) for m in r.outside_sample]}
                    for r in results},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    select = commands.add_parser("select", help="print the names of the mutants to run")
    select.add_argument("--unchecked", action="store_true", help="only those without a result in mutants/")
    write = commands.add_parser("report", help="write report.md and report.json")
    write.add_argument("--equivalent", type=Path, default=Path("tests/mutation/mutation_equivalent.txt"))
    write.add_argument("--out", type=Path, default=Path("bench_results/mutation"))
    write.add_argument("--wall-seconds", type=float)
    for command in (select, write):
        command.add_argument("specs", nargs="+", type=Spec.parse, metavar="module[:N]")
    args = parser.parse_args()

    if args.command == "select":
        for spec in args.specs:
            done = spec.results() if args.unchecked else {}
            for name in spec.mutant_names():
                if spec.in_sample(name) and done.get(name) is None:
                    print(name)
    else:
        report(args.specs, args.out, args.equivalent, args.wall_seconds)


if __name__ == "__main__":
    main()
