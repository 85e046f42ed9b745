"""Every planted bug in parity_tests/mutants.py makes the parity tests fail.

The control run (no mutant, on the same copy of the project) must pass, so a failure is the
mutant's doing. It is one run of every mutant's selection together (their union: each file
with the OR of its selections), which costs one interpreter start instead of one per
selection; each selection being non-empty is shown by its mutants being caught."""

from __future__ import annotations

import pytest

from parity_tests.mutants import MUTANTS
from parity_tests.mutation import run_suite

SELECTIONS = sorted({(m.tests, m.select) for m in MUTANTS})


def test_control_run_of_every_selection_passes():
    assert all(select for _, select in SELECTIONS)  # an empty -k would select whole files: see union
    tests = tuple(sorted({t for ts, _ in SELECTIONS for t in ts}))
    union = " or ".join(f"({select})" for select in sorted({s for _, s in SELECTIONS}))
    result = run_suite(None, tests, union)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_planted_bug_is_caught(mutant):
    result = run_suite(mutant, mutant.tests, mutant.select)
    # 1 = tests ran and failed. 0 would mean the bug went unnoticed; 2+ an import/collection
    # error, which is not the parity suite catching anything.
    assert result.returncode == 1, (f"exit {result.returncode}\n" + result.stdout[-3000:]
                                    + result.stderr[-3000:])
    assert " failed" in result.stdout
