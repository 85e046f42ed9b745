"""The run directory: taken (an exclusive lock, so two runs never share one) and started (config.json)
only once every rank has validated its inputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

from torch_impl.sharding.comm import any_rank, barrier
from torch_impl.training.config import UsageError
from torch_impl.training.plan import CONFIG_FILE, Plan
from torch_impl.training.runtime import Dist

_LOCKS: list = []  # open lock files: held until release_locks() (or the process ends, however it ends)


def lock_out_dir(out_dir: Path) -> str | None:
    """Take the run directory's lock (an exclusive flock on <out_dir>/.lock, released when the process
    ends, however it ends); None on success, else who holds it. Needs a file system with working flock
    (local disks; NFS only with lock support)."""
    import fcntl
    f = (out_dir / ".lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return f"locked by {holder}"
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS.append(f)
    return None


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().close()  # releases the flock


def start_out_dir(plan: Plan, d: Dist) -> None:
    """Create the run directory and write config.json. Only now is anything written, once every rank has
    validated its inputs (otherwise a slow rank could find rank 0's fresh metrics.jsonl and take it for a
    previous run)."""
    barrier()
    held_by = None
    if d.master:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        held_by = lock_out_dir(plan.out_dir)
    (busy,) = any_rank([held_by is not None])  # every rank stops, not only rank 0
    if busy:
        raise UsageError(f"{plan.out_dir} is in use by another run ({held_by or 'see rank 0'}); two runs in one "
                         "--out-dir would overwrite each other's checkpoints")
    if d.master:
        if plan.replace_previous:
            shutil.rmtree(plan.out_dir / "checkpoints", ignore_errors=True)
        (plan.out_dir / CONFIG_FILE).write_text(json.dumps(dict(
            args=plan.cfg.to_dict(), model_config=asdict(plan.model_config), world_size=d.world_size,
            grad_accum=plan.grad_accum, total_batch_size=plan.total_batch_size, num_steps=plan.num_steps,
            ns_dtype=str(plan.ns_dtype), device=str(d.device)), indent=2) + "\n")
    barrier()
