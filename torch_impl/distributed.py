"""Communication helpers for the sharded optimizers (DistMuon, DistAdamW).

- `Comm`: the process group an optimizer talks to (rank, world size; world size 1 when no
  group is initialized), its collectives launched with `async_op=True` and returned as
  `Work` handles (gloo's `Work.get_future()` raises, so callers `wait()` on the handles),
  and optional byte counters (`CommStats`).
- `check_same_on_all_ranks`: a small all_gather at construction that makes every rank raise
  together when the parameter lists differ (or one rank failed locally) instead of some
  ranks hanging in the first collective.
- `sync_grad_flags`: one all_reduce(MAX) per step of per-parameter "gradient non-finite",
  "gradient present" and "gradient absent" flags, so every rank raises or skips together.

Timeouts: a collective whose peer never arrives waits for the process group's `timeout`, so
always create the group with a finite one, e.g.
`dist.init_process_group("gloo", timeout=timedelta(seconds=60))` (`init_from_env` does).
The errors above are detected collectively, so they raise on every rank at once; the
timeout is the last line of defence for bugs (a rank that crashed or skipped a call).

Byte accounting uses the ring model: reduce_scatter and all_gather of a tensor of B bytes
(full, unsharded size) send (N−1)/N·B bytes per rank, all_reduce 2·(N−1)/N·B. Backends may
use other algorithms: benchmarks/distributed.py measures the real loopback traffic, and
gloo's reduce_scatter_tensor (torch 2.13) puts 2·(N−1)/N·B on the wire, as much as an
all_reduce; all_gather and all_reduce match the model.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from torch_impl.finite import named_params

DEFAULT_TIMEOUT = timedelta(seconds=300)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Initialize the default group from torchrun's environment (RANK, WORLD_SIZE, ...):
    NCCL on CUDA (device = LOCAL_RANK), gloo otherwise, always with a finite timeout.
    Returns (rank, world size); a no-op returning (0, 1) outside torchrun."""
    if is_initialized():
        return world()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return world()


@dataclass
class CommStats:
    """Counters since construction or the last `reset()`; `steps` counts optimizer steps.

    bytes_sent: ring-model bytes this rank sent, per collective kind; payload: full-size
    bytes of the tensors handed to each kind; calls: number of collectives per kind;
    matrices: matrices orthogonalized on this rank (DistMuon); elements: parameter elements
    updated on this rank (DistAdamW)."""
    bytes_sent: dict[str, float] = field(default_factory=dict)
    payload: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    matrices: int = 0
    elements: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.bytes_sent.clear(), self.payload.clear(), self.calls.clear()
        self.matrices = self.elements = self.steps = 0

    def add(self, kind: str, full_bytes: int, ring_factor: float) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0.0) + ring_factor * full_bytes
        self.payload[kind] = self.payload.get(kind, 0) + full_bytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total_bytes_sent(self) -> float:
        return sum(self.bytes_sent.values())


class Comm:
    """A process group (None: the default one) seen from one rank, with byte counters."""

    def __init__(self, group=None, track_stats: bool = False):
        self.group = group
        self.rank, self.world_size = world(group)
        self.stats = CommStats() if track_stats else None

    @property
    def device(self) -> torch.device:
        """Where small control tensors (flags, signatures) live: NCCL needs CUDA tensors."""
        if is_initialized() and "nccl" in str(dist.get_backend(self.group)):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _count(self, kind: str, full_bytes: int, ring_factor: float) -> None:
        if self.stats is not None:
            self.stats.add(kind, full_bytes, ring_factor)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.AVG):
        """Async: `out` (dim 0 = inp's / N) receives this rank's chunk of op over ranks."""
        n = self.world_size
        self._count("reduce_scatter", inp.numel() * inp.element_size(), (n - 1) / n)
        return dist.reduce_scatter_tensor(out, inp, op=op, group=self.group, async_op=True)

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


def chunk_rows(n_rows: int, world_size: int) -> int:
    """Rows (or matrices) per rank when `n_rows` are split evenly after zero padding:
    ceil(n/N). Rank r owns [r·c, min((r+1)·c, n)), possibly empty: the same split as
    torch.chunk and DTensor's Shard(0), which the checkpoint code relies on."""
    return max(1, math.ceil(n_rows / world_size))


def owned_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    c = chunk_rows(n_rows, world_size)
    return min(rank * c, n_rows), min((rank + 1) * c, n_rows)


def param_signature(param_groups: list[dict]) -> str:
    """Names, shapes and dtypes of every parameter, group by group: what must agree across
    ranks for the collectives of a step to line up."""
    lines = []
    for gi, group in enumerate(param_groups):
        for name, p in named_params(group):
            lines.append(f"{gi} {name} {tuple(p.shape)} {p.dtype} {p.device.type}")
    return "\n".join(lines)


def local_device_error(param_groups: list[dict]) -> str | None:
    devices = {p.device for g in param_groups for p in g["params"]}
    if len(devices) > 1:
        return f"all parameters must be on one device, found {sorted(map(str, devices))}"
    return None


def check_same_on_all_ranks(comm: Comm, signature: str, local_error: str | None, what: str) -> None:
    """All-gather a hash of `signature` plus a local-error flag and raise on every rank if
    any rank failed or the hashes differ. A no-op at world size 1."""
    if comm.world_size == 1:
        if local_error:
            raise ValueError(local_error)
        return
    digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
    mine = torch.tensor([digest, int(local_error is not None)], dtype=torch.int64, device=comm.device)
    every = torch.empty(comm.world_size * 2, dtype=torch.int64, device=comm.device)
    dist.all_gather_into_tensor(every, mine, group=comm.group)
    every = every.view(-1, 2).tolist()
    failed = [r for r, (_, err) in enumerate(every) if err]
    if failed:
        raise ValueError(f"{what} failed on rank(s) {failed}: "
                         f"{local_error or 'see the error raised on those ranks'}")
    if len({h for h, _ in every}) > 1:
        classes = {}
        for r, (h, _) in enumerate(every):
            classes.setdefault(h, []).append(r)
        raise ValueError(f"{what}: parameter lists differ across ranks (rank groups with equal "
                         f"lists: {sorted(classes.values())}); every rank must pass the same "
                         f"parameters in the same order. This rank (rank {comm.rank}) has:\n"
                         + signature[:2000])


def sync_grad_flags(comm: Comm, param_groups: list[dict], check_finite: bool) -> list[str]:
    """One all_reduce(MAX) over per-parameter flags [non-finite, present, absent].

    Raises on every rank if some parameter has a gradient on some ranks but not on others
    (the sharded collectives would otherwise be built from different stacks and hang).
    Returns the names whose gradient is non-finite on any rank (empty if not checked)."""
    named = [(n, p) for g in param_groups for n, p in named_params(g)]
    if not named:
        return []
    dev = comm.device
    grads = [p.grad for _, p in named]
    present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=dev)
    if check_finite and any(g is not None for g in grads):
        finite = [torch.isfinite(g).all() for g in grads if g is not None]
        bad = torch.zeros(len(grads), dtype=torch.int32, device=dev)
        bad[present.bool()] = (~torch.stack(finite)).to(device=dev, dtype=torch.int32)
    else:
        bad = torch.zeros(len(grads), dtype=torch.int32, device=dev)
    flags = torch.cat([bad, present, 1 - present])
    if comm.world_size > 1:
        comm.all_reduce(flags, op=dist.ReduceOp.MAX).wait()
    bad, any_present, any_absent = flags.view(3, -1).tolist()
    uneven = [n for (n, _), a, b in zip(named, any_present, any_absent) if a and b]
    if uneven:
        raise ValueError(f"gradient present on some ranks but not on others: {', '.join(uneven)}; "
                         "every rank must produce the same set of gradients (zero-fill unused ones)")
    return [n for (n, _), b in zip(named, bad) if b]


def init_collectively(opt, init, name: str, extra_signature: str = "") -> None:
    """Run a distributed optimizer's base __init__ (`init`), then compare parameter lists
    and devices across ranks. A local construction error (say a 1-D parameter in Muon) is
    shared through the same check first, so every rank raises and none waits in it."""
    error = None
    try:
        init()
    except ValueError as e:  # raise it only after telling the other ranks
        error = e
    signature = "" if error else extra_signature + param_signature(opt.param_groups)
    local = str(error) if error else local_device_error(opt.param_groups)
    try:
        check_same_on_all_ranks(opt.comm, signature, local, name)
    except ValueError:
        if error:
            raise error from None
        raise
