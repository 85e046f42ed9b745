"""Planted-bug (mutation) harness: proof that the parity suite can fail.

Each `Mutant` is a one-line source edit of torch_impl. `run_suite` copies the project
(packages, tests, conftest) into a temporary directory, applies the edit there — the
working tree is never touched — and runs a selection of parity tests in a subprocess
with the derandomized `mutation` hypothesis profile (`ci` without shrinking: a caught mutant
needs one failing example, not the smallest). A mutant is caught when pytest reports
test failures (exit code 1); an import or collection error (exit 2+) does not count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("torch_impl", "jax_reference", "parity_tests", "tests", "conftest.py", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str       # file relative to the project root
    find: str       # must occur exactly once
    replace: str
    tests: tuple[str, ...]  # pytest node ids / paths, relative to the root
    select: str = ""        # optional -k expression


def apply(mutant: Mutant, root: Path) -> None:
    f = root / mutant.path
    src = f.read_text()
    count = src.count(mutant.find)
    if count != 1:
        raise AssertionError(f"mutant {mutant.name!r}: pattern found {count} times in {mutant.path}; "
                             "the mutant would not be the intended one-line bug")
    f.write_text(src.replace(mutant.find, mutant.replace))


def run_suite(mutant: Mutant | None, tests: tuple[str, ...], select: str = "",
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `tests` on a copy of the project with `mutant` applied (None: the control)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, root / name)
        if mutant is not None:
            apply(mutant, root)
        env = dict(os.environ, HYPOTHESIS_PROFILE="mutation", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=str(root))
        # -m: the CI suite's marker selection (slow tests are for the thorough runs, not for this)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not cuda",
               *tests]
        if select:
            cmd += ["-k", select]
        # Guard: the copy, not the installed project, must be what the tests import.
        cmd_check = [sys.executable, "-c", "import torch_impl; print(torch_impl.__file__)"]
        where = subprocess.run(cmd_check, cwd=root, env=env, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(root)):
            raise AssertionError(f"mutation run would import {where.stdout.strip()!r}, not the copy")
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
