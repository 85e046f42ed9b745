"""Every planted bug in parity_tests/mutants.py makes the parity tests fail.

The control run (no mutant, same selection) must pass, so a failure is the mutant's doing."""

from __future__ import annotations

import pytest

from parity_tests.mutants import MUTANTS
from parity_tests.mutation import run_suite

SELECTIONS = sorted({(m.tests, m.select) for m in MUTANTS})


@pytest.mark.parametrize("tests,select", SELECTIONS, ids=[s or t[0] for t, s in SELECTIONS])
def test_control_selection_passes(tests, select):
    result = run_suite(None, tests, select)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_planted_bug_is_caught(mutant):
    result = run_suite(mutant, mutant.tests, mutant.select)
    # 1 = tests ran and failed. 0 would mean the bug went unnoticed; 2+ an import/collection
    # error, which is not the parity suite catching anything.
    assert result.returncode == 1, (f"exit {result.returncode}\n" + result.stdout[-3000:]
                                    + result.stderr[-3000:])
    assert " failed" in result.stdout
