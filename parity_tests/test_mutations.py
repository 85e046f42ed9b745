"""Every planted bug in parity_tests/mutants.py makes the parity tests fail, and the test that
fails passes without the bug.

Each mutant runs its selection on a mutated copy of the project until the first failure; the
failed test is then run on an unmutated copy (the control, once per test for all the mutants it
catches), which must pass, so the failure is the mutant's doing and not the copy's (a file the
copy lacks, an environment difference). A
selection that selects nothing cannot catch its mutant, so every selection is shown non-empty."""

from __future__ import annotations

import pytest

from parity_tests.mutants import MUTANTS
from parity_tests.mutation import control, failed_tests, run_suite


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_planted_bug_is_caught(mutant):
    result = run_suite(mutant, mutant.tests, mutant.select)
    # 1 = tests ran and failed. 0 would mean the bug went unnoticed; 2+ an import/collection
    # error, which is not the parity suite catching anything.
    assert result.returncode == 1, f"exit {result.returncode}\n" + result.stdout[-5000:]
    assert " failed" in result.stdout
    failed = failed_tests(result.stdout)
    assert failed, result.stdout[-3000:]
    unmutated = control(tuple(failed))
    assert unmutated.returncode == 0 and " passed" in unmutated.stdout, (
        f"{failed} fail without the mutant too (exit {unmutated.returncode})\n" + unmutated.stdout[-3000:])


def test_failed_tests_reads_the_short_summary():
    out = ("..F\n=========================== short test summary info ============================\n"
           "FAILED parity_tests/test_a.py::test_b[x-1] - AssertionError: assert 1 == 2\n"
           "FAILED tests/dist/test_c.py::test_d\n!!!!! stopping after 1 failures !!!!!\n1 failed, 2 passed in 1.0s\n")
    assert failed_tests(out) == ["parity_tests/test_a.py::test_b[x-1]", "tests/dist/test_c.py::test_d"]
    assert failed_tests("3 passed in 0.1s\n") == []
