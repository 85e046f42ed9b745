"""The job's runtime: this process's place in it (`Dist`), joining it (`init_from_env`, the one
process-group initializer: torchrun's environment; NCCL on CUDA with one device per rank, gloo
otherwise; always a finite timeout), and naming the failure when a collective does not complete.

Timeouts: a collective whose peer never arrives waits for the process group's `timeout`, so the
group is always created with a finite one; `collective_timeout` lengthens it for checkpoint I/O.
A collective that fails (a rank died, hangs or fell far behind) is turned into one
`CollectiveFailure` line naming the step and, through the rendezvous store, the silent ranks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from torch_impl.sharding.comm import collective_device, is_initialized, world

DEFAULT_TIMEOUT = timedelta(seconds=300)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: its rank, world size and the device it computes on."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def active(self) -> bool:
        """Whether there are other ranks to talk to."""
        return self.world_size > 1

    @property
    def master(self) -> bool:
        """Rank 0: the one that prints and writes shared files."""
        return self.rank == 0


class CollectiveFailure(RuntimeError):
    """A collective did not complete: another rank died, hung, or fell far behind."""


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` comes from a collective that failed or timed out (gloo and NCCL raise
    RuntimeError subclasses, with the backend's name in the message)."""
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(k in str(e) for k in ("gloo", "NCCL", "Timed out", "Connection")))


def unanswered_ranks(tag: str, rank: int, world_size: int, grace_s: float = 5.0) -> list[int] | None:
    """After a failed collective, which ranks did not answer: every surviving rank writes `tag/<rank>`
    into the rendezvous store (the launcher's, which outlives the workers under torchrun) and waits up
    to `grace_s` for the others. Returns the ranks whose key never came (dead, hung, or far behind),
    or None when the store itself cannot be reached (it lived in the dead rank 0: plain env://)."""
    import time
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=grace_s))
        store.set(f"{tag}/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r in range(world_size) if not store.check([f"{tag}/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - any store failure: no names, the caller says what it knows
        return None


@contextmanager
def collective_timeout(seconds: float, restore: float, group=None):
    """Collectives of `group` (the default one) may wait `seconds` inside the block, then
    `restore` seconds again: e.g. a longer bound for checkpoint I/O than for the training loop.
    A no-op without a process group."""
    from torch.distributed.distributed_c10d import _set_pg_timeout
    if not is_initialized():
        yield
        return
    _set_pg_timeout(timedelta(seconds=seconds), group)
    try:
        yield
    finally:
        _set_pg_timeout(timedelta(seconds=restore), group)


def init_from_env(device: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT) -> Dist:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in the environment): initialize the
    default process group, NCCL on CUDA with GPU LOCAL_RANK per rank, gloo on CPU. Without torchrun (no
    RANK) there is no process group: a Dist of one rank. `device` is "auto" (cuda if available), "cpu" or
    "cuda". If a group is already initialized (tests, benchmarks), this describes it instead.

    The finite timeout turns a rank that died into an error on the others instead of a hang. NCCL gets
    `device_id`, binding the group to this rank's GPU at once rather than guessing it at the first
    collective."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but no CUDA device is available")
    if is_initialized():
        rank, world_size = world()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, local_rank, world_size, collective_device())
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device(device_type))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    store = restart_store(rank, world_size, timeout)
    if device_type == "cuda":
        gpu = torch.device("cuda", local_rank)
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=gpu, timeout=timeout, store=store,
                                rank=rank if store else -1, world_size=world_size if store else -1)
        return Dist(rank, local_rank, world_size, gpu)
    dist.init_process_group("gloo", timeout=timeout, store=store, rank=rank if store else -1,
                            world_size=world_size if store else -1)
    return Dist(rank, local_rank, world_size, torch.device("cpu"))


def restart_store(rank: int, world_size: int, timeout: timedelta):
    """Under torchrun, a rendezvous store private to this restart attempt; None otherwise (env://).

    torchrun --max-restarts restarts every worker on one store. gloo's full-mesh connect reads the
    peers' addresses from it, and after a restart it can read the dead workers' addresses of the
    previous attempt (same keys) and fail with "Connection refused" (measured: most restarts). A
    key prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps each attempt's addresses apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"torch_impl/attempt_{attempt}", base)


class RunningStep:
    """The step a failure belongs to (set by the loop as it goes)."""

    def __init__(self, step: int = 0):
        self.step = step


@contextmanager
def collective_failures_named(d: Dist, timeout_s: float):
    """Around the training loop: a collective that fails or times out becomes one
    CollectiveFailure line naming the step (the yielded RunningStep's), the timeout, and the ranks
    that did not answer (asked through the rendezvous store), raised on every surviving rank."""
    running = RunningStep()
    try:
        yield running
    except Exception as e:
        if not is_collective_failure(e):
            raise
        silent = unanswered_ranks(f"torch_impl/failed_step_{running.step}", d.rank, d.world_size)
        who = (f"rank(s) {', '.join(map(str, silent))} did not answer (dead, hung, or far behind)" if silent
               else "a rank died, hangs, or is far behind")
        raise CollectiveFailure(
            f"step {running.step}: a collective did not complete within --collective-timeout {timeout_s:g} s; "
            f"{who}; rank {d.rank} of {d.world_size} reports: {str(e).strip().splitlines()[0][:300]}") from None
