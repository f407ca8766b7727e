#!/usr/bin/env bash
# Mutation testing of handler/ against the unit tests, with mutmut (not run in CI: it takes hours on two cores).
#   tests/mutation/mutation.sh [-j J] [--resume] [module[:N] ...]
# module: a name under handler/ (default: imaging codecs config preprocess engine); module:N runs a fixed
#   1-in-N sample of that module's mutants instead of all of them (the report says so).
# -j J: mutants run at a time (default 2). --resume: keep mutants/ from an interrupted run (handler/ and tests/
#   unchanged) and run only what has no result yet; otherwise every run starts from a fresh copy.
# Each mutant runs the unit tests that reach the mutated function, and stops at the first failure. The report,
# printed and written to bench_results/mutation/report.md and report.json, gives per module the score =
# killed / (total - equivalent) and every surviving mutant with its diff. Known equivalent mutants are listed,
# with reasons, in tests/mutation/mutation_equivalent.txt. mutmut's settings are in pyproject.toml ([tool.mutmut]).
set -euo pipefail
cd "$(dirname "$0")/../.."

jobs=2
resume=""
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in
        -j) jobs="$2"; shift 2 ;;
        --resume) resume=1; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
specs=("$@")
if [[ ${#specs[@]} -eq 0 ]]; then
    specs=(imaging codecs config preprocess engine)
fi

if [[ -n "$resume" ]]; then
    for spec in "${specs[@]}"; do
        module="${spec%%:*}"
        if [[ ! -f "mutants/handler/$module.py.meta" || "handler/$module.py" -nt "mutants/handler/$module.py" ]]; then
            echo "cannot resume: no results for handler/$module.py in mutants/, or it changed since" >&2
            exit 2
        fi
    done
    if [[ -n "$(find tests -name '*.py' -newer mutants/mutmut-stats.json -print -quit)" ]]; then
        echo "cannot resume: tests/ changed since the run began" >&2
        exit 2
    fi
else
    rm -rf mutants
fi
# The tests read the photo corpus from <repo>/.cache; inside mutants/ that is mutants/.cache, so link it there.
.venv/bin/python scripts/make_corpus.py >/dev/null
mkdir -p mutants
ln -sfn ../.cache mutants/.cache

selected=$(.venv/bin/python tests/mutation/mutation_results.py select ${resume:+--unchecked} "${specs[@]}")
names=()
if [[ -n "$selected" ]]; then
    mapfile -t names <<< "$selected"
fi
out=bench_results/mutation
mkdir -p "$out"
start=$(date +%s)
if [[ ${#names[@]} -gt 0 ]]; then
    echo ">> mutmut run: ${#names[@]} mutants of ${specs[*]}, $jobs at a time; full log: $out/mutmut.log"
    # mutmut redraws one status line with \r behind a spinner glyph: print each message once, the count every
    # 25 mutants, and not the closing list of every mutant's result (it is in the log and the report).
    .venv/bin/mutmut run --max-children "$jobs" "${names[@]}" 2>&1 | tee ${resume:+-a} "$out/mutmut.log" \
        | stdbuf -o0 tr '\r' '\n' | awk '
        { body = $0; if (body ~ /^[^\t -~]/) sub(/^[^ ]+ /, "", body) }
        body ~ /__mutmut_[0-9]+$/ { next }
        body ~ /^[0-9]+\/[0-9]+ / {
            split(body, count, "/")
            if (count[1] + 0 >= shown + 25) { shown = count[1] - count[1] % 25; print body; fflush() }
            next
        }
        body != last && body ~ /[^ ]/ { print body; fflush() }
        { last = body }'
else
    echo ">> nothing left to run"
fi
timing=()
if [[ ${#names[@]} -gt 0 ]]; then
    timing=(--wall-seconds "$(($(date +%s) - start))")
fi

echo ">> report"
.venv/bin/python tests/mutation/mutation_results.py report "${timing[@]}" --out "$out" "${specs[@]}"
