"""Helpers of the training tests: run the real CLIs in subprocesses and read their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A model small enough to train a few dozen steps in seconds on 2 CPU cores, on the first ~300 KB of
# the default (stdlib) corpus.
TINY = ["--depth", "2", "--seq-len", "64", "--device-batch-size", "4", "--max-corpus-bytes", "300000",
        "--eval-tokens", "1024", "--sample-tokens", "0"]

# The shared training run (conftest.py's session fixture `trained`): 40 steps of TINY, evaluated
# every 20, with a 40-token sample at the end.
TRAINED_STEPS = 40
TRAINED_ARGS = [*TINY, "--steps", str(TRAINED_STEPS), "--eval-every", "20"]


def env() -> dict:
    # one thread per process: the test runner and other jobs share the cores, and oversubscribed
    # OpenMP threads make torch 10x slower rather than 2x
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


def run(args: list[str], ranks: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch_impl.train ARGS` (ranks None: no torchrun, no process group), or the same under
    `torchrun --standalone --nproc_per_node=ranks`. A module other than train: pass ["-m", ...] yourself."""
    if args and args[0] == "-m":
        cmd = [sys.executable, *args]
    elif ranks is None:
        cmd = [sys.executable, "-m", "torch_impl.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "torch_impl.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def metrics(out_dir: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["type"] == kind]


def tree(path: Path) -> dict[str, int]:
    """Relative path -> size of every file under path: a cheap 'nothing changed' fingerprint."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(Path(path).rglob("*")) if p.is_file()}


def train_once(out_dir: Path) -> subprocess.CompletedProcess:
    """The shared training run into `out_dir` (a fresh directory)."""
    return check(run([*TRAINED_ARGS, "--out-dir", str(out_dir), "--sample-tokens", "40", "--sample-prompt", "def "]))
