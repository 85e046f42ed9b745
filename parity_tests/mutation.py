"""Planted-bug (mutation) harness: proof that the parity suite can fail.

Each `Mutant` is a one-line source edit of torch_impl. `run_suite` copies the project
(packages, tests, conftest) into a temporary directory, applies the edit there — the
working tree is never touched — and runs a selection of tests on the copy with the
derandomized `mutation` hypothesis profile (`ci` without shrinking: a caught mutant needs one
failing example, not the smallest). A mutant is caught when pytest reports test failures
(exit code 1); an import or collection error (exit 2+) does not count. `failed_tests` reads
which tests failed, so that the same tests can be run on an unmutated copy (the control).

Runs are forks of one warm process (`Server`): it imports torch, JAX, optax, hypothesis and
pytest once (~4 s of CPU each time otherwise) and never the project, so each fork imports the
copy's torch_impl fresh. A run's fork puts the copy first on sys.path, checks that torch_impl
comes from the copy, and calls pytest.main in the copy's directory, its output going to a file.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("torch_impl", "jax_reference", "parity_tests", "tests", "conftest.py", "pyproject.toml")
# What the server imports before forking: the heavy third-party modules, never the project.
PRELOAD = ("torch", "torch.distributed", "numpy", "jax", "jax.numpy", "optax", "ml_dtypes", "hypothesis",
           "pytest")

# The server: reads one JSON request per line {root, args, env, log, timeout}, forks, and answers
# {"code": exit code} (or -9 after killing a run that outlived its timeout).
SERVER = r"""
import importlib, json, os, signal, sys, time
for name in sys.argv[1].split(","):
    importlib.import_module(name)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.update(req["env"])
        os.chdir(req["root"])
        sys.path.insert(0, req["root"])
        import torch_impl
        if not torch_impl.__file__.startswith(req["root"]):
            print(f"mutation run would import {torch_impl.__file__!r}, not the copy", flush=True)
            os._exit(3)
        import pytest
        code = pytest.main(req["args"])
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(int(code))
    deadline, status = time.monotonic() + req["timeout"], None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -9
        else:
            time.sleep(0.05)
    print(json.dumps({"code": status}), flush=True)
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str       # file relative to the project root
    find: str       # must occur exactly once
    replace: str
    tests: tuple[str, ...]  # pytest node ids / paths, relative to the root
    select: str = ""        # optional -k expression


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str     # pytest's output (stdout and stderr together)


def apply(mutant: Mutant, root: Path) -> None:
    f = root / mutant.path
    src = f.read_text()
    count = src.count(mutant.find)
    if count != 1:
        raise AssertionError(f"mutant {mutant.name!r}: pattern found {count} times in {mutant.path}; "
                             "the mutant would not be the intended one-line bug")
    f.write_text(src.replace(mutant.find, mutant.replace))


def copy_project(dest: Path) -> None:
    """The project's files with their modification times, and their bytecode caches: a .pyc is
    used only while its source's size and mtime match, so the copies skip compiling every module
    again and a mutated file (rewritten, so newer) is compiled afresh."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)


class Server:
    """The warm process runs fork from (one per test process, started on first use)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, ",".join(PRELOAD)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                                     env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        atexit.register(self.close)

    def run(self, root: Path, args: list[str], env: dict, timeout: float) -> Result:
        with tempfile.NamedTemporaryFile(prefix="mutation-", suffix=".log", delete=False) as log:
            path = log.name
        try:
            request = dict(root=str(root), args=args, env=env, log=path, timeout=timeout)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"the mutation server died (exit {self.proc.poll()})")
            return Result(json.loads(answer)["code"], Path(path).read_text(errors="replace"))
        finally:
            os.unlink(path)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_server: Server | None = None


def server() -> Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = Server()
    return _server


def run_suite(mutant: Mutant | None, tests: tuple[str, ...], select: str = "",
              timeout: float = 600) -> Result:
    """Run `tests` on a copy of the project with `mutant` applied (None: the control)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp)
        copy_project(root)
        if mutant is not None:
            apply(mutant, root)
        env = dict(HYPOTHESIS_PROFILE="mutation", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root))
        # -m: the CI suite's marker selection (slow tests are for the thorough runs, not for this); -rf: the
        # summary names the failed tests
        args = ["-x", "-q", "-rf", "-p", "no:cacheprovider", "-m", "not slow and not cuda", *tests]
        if select:
            args += ["-k", select]
        return server().run(root, args, env, timeout)


_controls: dict[tuple[str, ...], Result] = {}


def control(tests: tuple[str, ...]) -> Result:
    """`tests` on an unmutated copy, once per test process (mutants often fail the same test)."""
    if tests not in _controls:
        _controls[tests] = run_suite(None, tests)
    return _controls[tests]


def failed_tests(output: str) -> list[str]:
    """The node ids pytest's short summary (-rf) lists as FAILED."""
    return sorted({m.group(1) for m in re.finditer(r"^FAILED (\S+?)(?: - .*)?$", output, re.M)})
