"""pytest plugin for tests/mutation/mutation.sh: run each mutant's likeliest killers first.

For every mutant mutmut runs the unit tests that reached the mutated function and stops at the first
failure, but in its forkserver mode it passes them in no particular order, so a mutant that one quick
test kills often waits behind the slow engine tests. This puts the mutated module's own test file
first, then the other files from the cheapest, each file's tests from the fastest (files stay together
so their module fixtures are set up once). It changes no verdict, only how soon a kill happens.

It also keeps mutmut's coverage run ("stats") out of child processes: tests that run our scripts as
commands from another directory would otherwise record coverage there and fail on mutmut's missing config.

Loaded by ``-p tests.mutation.mutation_order`` ([tool.mutmut] pytest_add_cli_args); inert outside a mutant.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

STATS_FILE = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/


def pytest_configure(config: pytest.Config) -> None:
    # In this process mutmut keeps its own copy of the setting, so its trampolines still record coverage here;
    # child processes inherit the environment without it and run the original code.
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        del os.environ["MUTANT_UNDER_TEST"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:  # stats, clean and forced-fail runs keep pytest's order
        return
    own_file = f"tests/test_{mutant.split('.')[1]}.py"  # handler.<module>.x_function__mutmut_<n>
    try:
        durations: dict[str, float] = json.loads(STATS_FILE.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        durations = {}
    file_cost: dict[str, float] = defaultdict(float)
    for item in items:
        file_cost[item.nodeid.partition("::")[0]] += durations.get(item.nodeid, 0.0)

    def key(item: pytest.Item) -> tuple[bool, float, str, float]:
        path = item.nodeid.partition("::")[0]
        return path != own_file, file_cost[path], path, durations.get(item.nodeid, 0.0)

    items.sort(key=key)
