"""Every torch.distributed collective of torch_impl goes through this module (a structure test,
tests/test_package_structure.py, holds the rest of the package to it), so one rule decides where
their tensors live: `collective_device(group)`.

- `collective_device`: the device a group's collectives take tensors on: the CPU when the group
  has a CPU backend (gloo), else the current CUDA device (NCCL, or a CUDA-only gloo group made
  as "cuda:gloo"). It is read from the group's backends, not guessed from the backend's name.
- `any_rank(flags)`: the one agreement helper. Elementwise max over ranks of small integer flags
  (for 0/1 flags: whether any rank raised one), so that every rank takes the same branch: a
  failed save, a received signal, a locked out-dir, a non-finite gradient.
- `reduce_`, `barrier`, `broadcast_object`, `all_gather_object`, `all_gather_ints`, `send`,
  `recv`: the synchronous collectives of the training loop, checkpoints and checks, each
  placing its tensors on the collective's device (and copying results back where they came from).
- `Comm`: the process group an optimizer talks to (rank, world size; `Comm.local()` is a
  single process that never communicates, whatever process group exists), its collectives
  launched with `async_op=True` and returned as `Work` handles (gloo's `Work.get_future()`
  raises, so callers `wait()` on the handles), and optional byte counters (`CommStats`).

Without an initialized process group every helper is the single-process answer (no collective).

Timeouts: a collective whose peer never arrives waits for the process group's `timeout`, so
always create the group with a finite one (training/runtime.py's `init_from_env` does). The
errors of the package are detected collectively (any_rank), so they raise on every rank at once;
the timeout is the last line of defence for bugs (a rank that crashed or skipped a call).

Byte accounting uses the ring model: reduce_scatter and all_gather of a tensor of B bytes
(full, unsharded size) send (N−1)/N·B bytes per rank, all_reduce 2·(N−1)/N·B. Backends may
use other algorithms: benchmarks/distributed.py measures the real loopback traffic, and
gloo's reduce_scatter_tensor (torch 2.13) puts 2·(N−1)/N·B on the wire, as much as an
all_reduce; all_gather and all_reduce match the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group=None) -> torch.device:
    """Where the tensors of `group`'s collectives must live: the CPU if the group has a CPU
    backend, else the current CUDA device (NCCL, like a "cuda:gloo" group, has no CPU backend:
    a CPU tensor in any of its collectives fails). The CPU without a process group."""
    if not is_initialized():
        return torch.device("cpu")
    pg = group if group is not None else dist.group.WORLD
    if torch.device("cpu") in pg._device_types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _active(group) -> bool:
    return is_initialized() and dist.get_world_size(group) > 1


def any_rank(flags: torch.Tensor | Sequence[int | bool], group=None) -> list[int]:
    """Elementwise max of integer `flags` over the ranks of `group` (the default group), on every
    rank: for 0/1 flags, 1 where any rank raised it. The flags travel on the collective's device,
    whatever device a tensor of them came from. Without other ranks: the flags themselves."""
    return Comm(group).any_rank(flags)


def reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce `t` in place over `group` and return it (a no-op without other ranks). A tensor on
    another device than the collective's is reduced through a copy there."""
    if not _active(group):
        return t
    device = collective_device(group)
    if t.device == device:
        dist.all_reduce(t, op=op, group=group)
        return t
    moved = t.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return t.copy_(moved)


def barrier(group=None) -> None:
    """Every rank of `group` reaches this point: the backend's own barrier on a group with a CPU
    backend (gloo); on a CUDA-only group a one-element all_reduce on the collective's device, since
    dist.barrier() would pick a device of its own (a guessed GPU for NCCL; a CPU tensor, which
    fails, for a "cuda:gloo" group)."""
    if not _active(group):
        return
    if collective_device(group).type == "cpu":
        dist.barrier(group=group)
    else:
        any_rank([0], group)


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` of rank `src` on every rank (pickled; torch puts the bytes on the collective's device)."""
    if not _active(group):
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=src, group=group)
    return payload[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order (pickled, as broadcast_object)."""
    if not _active(group):
        return [obj]
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, obj, group=group)
    return every


def all_gather_ints(values: Sequence[int], group=None) -> list[list[int]]:
    """Every rank's list of int64 `values` (the same length on every rank), in rank order."""
    if not _active(group):
        return [list(values)]
    device = collective_device(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    every = torch.empty(dist.get_world_size(group) * len(values), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(every, mine, group=group)
    return every.view(-1, len(values)).tolist()


def _global_rank(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def send(t: torch.Tensor, dst: int, group=None) -> None:
    """Point-to-point: `t` to rank `dst` of `group` (blocking), through the collective's device."""
    dist.send(t.to(collective_device(group)).contiguous(), _global_rank(group, dst), group=group)


def recv(shape, dtype: torch.dtype, src: int, group=None, device: torch.device | None = None) -> torch.Tensor:
    """Point-to-point: a tensor of `shape` and `dtype` from rank `src` of `group` (blocking),
    received on the collective's device and returned on `device` (default: that one)."""
    t = torch.empty(shape, dtype=dtype, device=collective_device(group))
    dist.recv(t, _global_rank(group, src), group=group)
    return t if device is None else t.to(device)


class Work:
    """A collective that is already complete: what a skipped collective returns."""

    def wait(self) -> bool:
        return True


DONE = Work()


@dataclass
class CommStats:
    """Counters since construction or the last `reset()`; `steps` counts optimizer steps.

    bytes_sent: ring-model bytes this rank sent, per collective kind; payload: full-size
    bytes of the tensors handed to each kind; calls: number of collectives per kind;
    matrices: matrices orthogonalized on this rank (Muon), ns_cost: their Newton-Schulz cost
    (placement.ns_cost); elements: parameter elements updated on this rank (AdamW)."""
    bytes_sent: dict[str, float] = field(default_factory=dict)
    payload: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    matrices: int = 0
    ns_cost: int = 0
    elements: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.bytes_sent.clear(), self.payload.clear(), self.calls.clear()
        self.matrices = self.ns_cost = self.elements = self.steps = 0

    def add(self, kind: str, full_bytes: int, sent_bytes: float) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0.0) + sent_bytes
        self.payload[kind] = self.payload.get(kind, 0) + full_bytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total_bytes_sent(self) -> float:
        return sum(self.bytes_sent.values())


class Comm:
    """A process group (None: the default one) seen from one rank, with byte counters.
    `Comm.local()` is this process alone: rank 0 of 1, whatever group exists."""

    def __init__(self, group=None, track_stats: bool = False, local: bool = False):
        self.group = group
        self.is_local = local
        self.rank, self.world_size = (0, 1) if local else world(group)
        self.stats = CommStats() if track_stats else None

    @classmethod
    def local(cls, track_stats: bool = False) -> Comm:
        return cls(None, track_stats, local=True)

    @property
    def device(self) -> torch.device:
        """Where small control tensors (flags, signatures) live: `collective_device(group)`."""
        return torch.device("cpu") if self.is_local else collective_device(self.group)

    def any_rank(self, flags: torch.Tensor | Sequence[int | bool]) -> list[int]:
        """`any_rank` over this group (the flags themselves for a local or one-rank Comm)."""
        if isinstance(flags, torch.Tensor):  # an integer tensor keeps its dtype
            flags = flags.to(device=self.device)
        else:
            flags = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            self.all_reduce(flags, op=dist.ReduceOp.MAX).wait()
        return flags.tolist()

    def _count(self, kind: str, full_bytes: int, ring_factor: float) -> None:
        if self.stats is not None:
            self.stats.add(kind, full_bytes, ring_factor * full_bytes)

    # planted-bug target (parity_tests/mutants.py)
    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.AVG):
        """Async: `out` (dim 0 = inp's / N) receives this rank's chunk of op over ranks."""
        n = self.world_size
        self._count("reduce_scatter", inp.numel() * inp.element_size(), (n - 1) / n)
        return dist.reduce_scatter_tensor(out, inp, op=op, group=self.group, async_op=True)

    def reduce_scatter_chunks(self, inp: torch.Tensor) -> tuple[torch.Tensor, Work]:
        """Async AVG reduce_scatter of `inp` (dim 0 = N chunks) into a new tensor holding this
        rank's chunk. With one rank that chunk is `inp` itself and nothing is launched."""
        if self.world_size == 1:
            return inp, DONE
        out = torch.empty(inp.shape[0] // self.world_size, *inp.shape[1:], dtype=inp.dtype, device=inp.device)
        return out, self.reduce_scatter(out, inp)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor):
        """Async: `out` (dim 0 = N × inp's) receives every rank's `inp`, in rank order."""
        n = self.world_size
        self._count("all_gather", out.numel() * out.element_size(), (n - 1) / n)
        return dist.all_gather_into_tensor(out, inp, group=self.group, async_op=True)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.AVG):
        """Async, in place."""
        n = self.world_size
        self._count("all_reduce", t.numel() * t.element_size(), 2 * (n - 1) / n)
        return dist.all_reduce(t, op=op, group=self.group, async_op=True)

    def all_to_all(self, inp: torch.Tensor, in_splits: list[int], out_splits: list[int],
                   kind: str = "all_to_all") -> tuple[torch.Tensor, Work]:
        """Async all_to_all of a flat buffer: `inp[sum(in_splits[:r]):][:in_splits[r]]` goes to
        rank r; the returned tensor holds, in rank order, `out_splits[s]` elements from each
        rank s. Counted under `kind` as the bytes that leave this rank (its own part stays).
        With one rank the output is `inp` itself and nothing is launched."""
        if self.world_size == 1:
            return inp, DONE
        out = torch.empty(sum(out_splits), dtype=inp.dtype, device=inp.device)
        if self.stats is not None:
            size = inp.element_size()
            self.stats.add(kind, inp.numel() * size, (inp.numel() - in_splits[self.rank]) * size)
        return out, dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
