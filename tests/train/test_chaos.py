"""Chaos: one training run under `torchrun --max-restarts` with `--resume auto`, hit by several faults
at random steps, ends bit-identical to an uninterrupted run of the same length. The faults, in order:

1. a rank killed (SIGKILL) in the middle of a checkpoint write (tests/train/faults/sitecustomize.py):
   the group fails, torchrun restarts it, the run resumes from the previous complete checkpoint;
2. a rank killed (SIGKILL) between checkpoints: restarted and resumed again;
3. SIGTERM to torchrun (preemption): every rank saves at the step boundary and the job exits;
   the same command line, launched again, continues the run to its end.

The steps are drawn at random (the seed is in every failure message; set CHAOS_SEED to replay one).
The CI variant has three faults in 40 steps; the soak variant (marked slow) repeats rounds of them
over a longer run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.common import REPO, TINY, check, env, metrics, run

FAULTS = Path(__file__).parent / "faults"


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in metrics(out_dir, "train")]


def worker_pid(torchrun: subprocess.Popen, rank: int) -> int:
    for pid in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {torchrun.pid}")


def launch(args: list[str], fault_env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=5",
           "-m", "torch_impl.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**env(), **fault_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def until_step(proc: subprocess.Popen, step: int, seen: list[str]) -> None:
    """Read proc's output until the line of `step` (which the run reaches only once: see the plan)."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step:5d}/"):
            return
    raise AssertionError(f"the run ended before step {step}")


def chaos(tmp_path: Path, steps: int, rounds: int, seed: int) -> None:
    args = [*TINY, "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "5", "--total-batch-size",
            "512", "--resume", "auto"]
    straight, chaotic = tmp_path / "straight", tmp_path / "chaotic"
    check(run([*args, "--out-dir", str(straight)], ranks=2))
    rng = random.Random(seed)
    run_args = [*args, "--out-dir", str(chaotic)]
    horizon = 0  # the highest step reached so far: a fault step above it is seen exactly once
    for r in range(rounds):
        # this round's steps (horizon, horizon + span], in thirds: the killed save, the kill, the SIGTERM
        span = (steps - 2 - horizon) // (rounds - r)
        third = span // 3
        # a checkpoint step with a complete checkpoint before it (at step 5 the restart would start afresh)
        save_kill = 5 * rng.randint(max(horizon // 5 + 1, 2), (horizon + third) // 5)
        kill = rng.randint(save_kill + 2, horizon + 2 * third)
        term = rng.randint(kill + 2, horizon + span)
        plan = f"seed {seed}, round {r}: kill in save of step {save_kill}, kill at {kill}, SIGTERM at {term}"
        proc = launch(run_args, {"PYTHONPATH": f"{FAULTS}{os.pathsep}{REPO}",
                                 "FAULT_KILL_SAVE": f"step_{save_kill:06d}"})  # rank 0: it writes meta.json
        seen: list[str] = []
        try:
            until_step(proc, kill, seen)  # past the killed save: torchrun restarted the group once
            os.kill(worker_pid(proc, 1 - r % 2), signal.SIGKILL)  # rank 1, then rank 0, ...
            until_step(proc, term, seen)
            proc.send_signal(signal.SIGTERM)
            rest, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out = "".join(seen) + rest
        assert proc.returncode != 0, (plan, out[-3000:])
        resumes = [line for line in out.splitlines() if line.startswith("resumed from")]
        # two restarts by torchrun (and, after the first round, the relaunch's own resume)
        assert len(resumes) == 2 + (r > 0) and "stopped by SIGTERM" in out, (plan, out[-3000:], err[-3000:])
        assert f"step_{save_kill:06d}" not in resumes[-2], (plan, resumes)  # the torn save is not resumed from
        horizon = term
    assert check(run(run_args, ranks=2)).stdout.count("resumed from") == 1  # the same command line finishes the run
    assert losses(chaotic) == losses(straight), f"seed {seed}"  # exact float equality


def seed() -> int:
    return int(os.environ.get("CHAOS_SEED", random.randrange(2**31)))


def test_chaos_faults_at_random_steps_end_bit_identical(tmp_path):
    chaos(tmp_path, steps=40, rounds=1, seed=seed())


@pytest.mark.slow
def test_chaos_soak(tmp_path):
    chaos(tmp_path, steps=150, rounds=4, seed=seed())
