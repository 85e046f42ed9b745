"""Run test bodies in N spawned gloo ranks, reusing the processes for many cases.

A fresh interpreter costs ~4 s of CPU (`import torch`), a gloo group ~0.5 s. So `RankPool`
starts its worker processes once, as forks of a forkserver that has imported torch (torch is
imported once per pool; measured: the planted-bug runs of the distributed tests in half the
time of spawned ranks), with OMP_NUM_THREADS=1, and re-forms the
process group only when a case asks for a different world size: workers 0..n-1 join a
fresh gloo group on a free localhost port, with the finite `PG_TIMEOUT_S` so a stuck
collective raises instead of hanging. `pool.run(n, fn, *args)` runs a module-level function
(sent by name: hypothesis-wrapped functions do not pickle) on ranks 0..n-1, returns their
results in rank order, and turns a failure on any rank into one AssertionError carrying each
failed rank's traceback. After a failure or timeout the workers are killed and respawned on
the next use, so one bad case cannot wedge the rest.

Inside a case, `rank()`/`world_size()` describe the group and `all_ranks_agree(ok, msg)`
makes an assertion collective: a local failure would otherwise let the other ranks run
ahead into collectives the failing rank never joins.
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import socket
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 30          # bounds every collective (init_process_group's timeout)
CASE_TIMEOUT_S = 180       # bounds one case, from the harness side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _regroup(rank: int, n: int, port: int, backend: str = "gloo") -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank < n:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=n, timeout=timedelta(seconds=PG_TIMEOUT_S))


def _worker(rank: int, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*_tensor.*", category=FutureWarning)
    while True:
        task = tasks.get()
        if task is None:
            return  # no destroy_process_group(): the process just exits
        case_id, (module, name), args, kwargs = task
        try:
            fn = (lambda *a: _regroup(rank, *a)) if module is None else getattr(importlib.import_module(module), name)
            results.put((case_id, rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((case_id, rank, False, traceback.format_exc()))


class RankPool:
    def __init__(self, max_world_size: int = 4):
        self.size = max_world_size
        self.procs: list = []
        self.world_size = None  # (size, backend) of the current process group
        self._case = 0

    def _start(self) -> None:
        # forkserver with torch preloaded: the server imports torch once and every rank is a
        # fork of it (~0.1 s) instead of a fresh interpreter importing torch (~4 s of CPU each)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.size)]
        self.procs = [ctx.Process(target=_worker, args=(r, self.tasks[r], self.results), daemon=True)
                      for r in range(self.size)]
        for p in self.procs:
            p.start()
        self.world_size = None

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def _dispatch(self, ranks: int, target, args, kwargs, timeout: float, what: str) -> list:
        self._case += 1
        task = (self._case, target, args, kwargs)
        pickle.dumps(task)  # fail here, not silently in the queue's feeder thread
        for r in range(ranks):
            self.tasks[r].put(task)
        got: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < ranks:
            if any(not ok for ok, _ in got.values()):
                # give the healthy ranks time to fail too (collective errors raise on all)
                deadline = min(deadline, time.monotonic() + PG_TIMEOUT_S + 5)
            try:
                case_id, r, ok, value = self.results.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline or not self.alive():
                    break
                continue
            if case_id == self._case:
                got[r] = (ok, value)
        if len(got) == ranks and all(ok for ok, _ in got.values()):
            return [got[r][1] for r in range(ranks)]
        self.close()  # a failed case may leave collectives unmatched: start afresh next time
        report = [f"{what} failed at world size {ranks}:"]
        for r in range(ranks):
            if r not in got:
                report.append(f"--- rank {r}: no result (timed out or died)")
            elif not got[r][0]:
                report.append(f"--- rank {r}:\n{got[r][1]}")
        raise AssertionError("\n".join(report))

    def run(self, n: int, fn, *args, timeout: float = CASE_TIMEOUT_S, backend: str = "gloo", **kwargs) -> list:
        """fn(*args, **kwargs) on ranks 0..n-1 of a group of size n (gloo, or another `backend`
        spec such as "cuda:gloo": gloo with only a CUDA backend); per-rank results."""
        if not 1 <= n <= self.size:
            raise ValueError(f"world size {n} outside 1..{self.size}")
        if not self.alive():
            self.close()
            self._start()
        if self.world_size != (n, backend):
            self._dispatch(self.size, (None, "_regroup"), (n, free_port(), backend), {}, 60, "regroup")
            self.world_size = (n, backend)
        return self._dispatch(n, (fn.__module__, fn.__name__), args, kwargs, timeout, fn.__name__)

    def close(self) -> None:
        for p, q in zip(self.procs, getattr(self, "tasks", [])):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        self.world_size = None


class RankGroup:
    """A world size (and backend) bound to a pool: `group.run(fn, *args)`."""

    def __init__(self, pool: RankPool, n: int, backend: str = "gloo"):
        self.pool, self.world_size, self.backend = pool, n, backend

    def run(self, fn, *args, **kwargs) -> list:
        return self.pool.run(self.world_size, fn, *args, backend=self.backend, **kwargs)


# -- helpers for case bodies (they run inside the ranks) ------------------------------------

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_ranks_agree(ok: bool, message: str = "") -> None:
    """Collective assert: raises on every rank if `ok` is False on any rank."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise AssertionError(f"[rank {rank()}: {'ok' if ok else 'FAILED'}] {message}")
