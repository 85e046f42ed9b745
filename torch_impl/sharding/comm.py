"""torch.distributed for the whole package: the process group, the collectives the optimizers
wrap around the math, the checks that make every failure collective, the synchronised clip.

- `init_from_env`: the one process-group initializer (torchrun's environment; NCCL on CUDA with
  one device per rank, gloo otherwise; always a finite timeout), returning a `Dist` record.
- `Comm`: the process group an optimizer talks to (rank, world size; `Comm.local()` is a
  single process that never communicates, whatever process group exists), its collectives
  launched with `async_op=True` and returned as `Work` handles (gloo's `Work.get_future()`
  raises, so callers `wait()` on the handles), and optional byte counters (`CommStats`).
- `check_same_on_all_ranks`: a small all_gather at construction that makes every rank raise
  together when the parameter lists differ (or one rank failed locally) instead of some
  ranks hanging in the first collective.
- `grad_flags`: one all_reduce(MAX) per step of per-parameter "gradient non-finite",
  "gradient present" and "gradient absent" flags, so every rank raises or skips together.
- `clip_grad_norm_synchronized_`: gradient clipping on the rank-averaged gradient.

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
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

DEFAULT_TIMEOUT = timedelta(seconds=300)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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
        on_gpu = "nccl" in str(dist.get_backend())
        return Dist(rank, local_rank, world_size,
                    torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"))
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
        """Where small control tensors (flags, signatures) live: NCCL needs CUDA tensors."""
        if not self.is_local and is_initialized() and "nccl" in str(dist.get_backend(self.group)):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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


def named_params(group: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, param) pairs of an optimizer group; unnamed params are named by position."""
    names = group.get("param_names") or [
        f"param[{i}] {tuple(p.shape)}" for i, p in enumerate(group["params"])]
    return list(zip(names, group["params"]))


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


def grad_flags(comm: Comm, param_groups: list[dict], check_finite: bool,
               reduced: dict[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """One all_reduce(MAX) over per-parameter flags [non-finite, present, absent].

    Raises on every rank if some parameter has a gradient on some ranks but not on others
    (the sharded collectives would otherwise be built from different stacks and hang).
    Returns the names whose gradient is non-finite on any rank (empty if not checked).
    `reduced`: parameters whose gradient was already sent off and dropped in backward
    (torch_impl/sharding/backward_reduce.py): present, with their recorded non-finite flag."""
    reduced = reduced or {}
    named = [(n, p) for g in param_groups for n, p in named_params(g)]
    if not named:
        return []
    dev = comm.device
    grads = [p.grad for _, p in named]
    has = [g is not None or p in reduced for g, (_, p) in zip(grads, named)]
    present = torch.tensor(has, dtype=torch.int32, device=dev)
    bad = torch.zeros(len(grads), dtype=torch.int32, device=dev)
    if check_finite and any(has):
        # a DTensor gradient (FSDP2) is checked on this rank's shard; the MAX below is global
        flags = [reduced[p] if p in reduced else ~torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all()
                 for g, (_, p) in zip(grads, named) if g is not None or p in reduced]
        bad[present.bool()] = torch.stack(flags).to(device=dev, dtype=torch.int32)
    flags = torch.cat([bad, present, 1 - present])
    if comm.world_size > 1:
        comm.all_reduce(flags, op=dist.ReduceOp.MAX).wait()
    bad, any_present, any_absent = flags.view(3, -1).tolist()
    uneven = [n for (n, _), a, b in zip(named, any_present, any_absent) if a and b]
    if uneven:
        raise ValueError(f"gradient present on some ranks but not on others: {', '.join(uneven)}; "
                         "every rank must produce the same set of gradients (zero-fill unused ones)")
    return [n for (n, _), b in zip(named, bad) if b]


# -----------------------------------------------------------------------------
# gradient clipping on the synchronised gradient

@torch.no_grad()
def clip_grad_norm_synchronized_(params, max_norm: float, group=None) -> torch.Tensor:
    """Average the gradients over the ranks of `group` in place, then scale them so that the global norm of
    that average is at most max_norm. Returns the norm before clipping (fp32 scalar).

    Why average first: DistMuon / DistAdamW average gradients inside their step, so clipping must act on
    the mean gradient g = (1/N) sum_r g_r. Its norm is not recoverable from per-rank norms (sum_r |g_r|^2
    is the mean of squares, not |g|^2), and clipping each g_r by its own norm gives a different direction.
    After the all_reduce every rank holds g exactly, so the optimizer's own reduce-scatter averages N
    identical copies: its result is g again (exactly for N = 2; for larger N the sum of N copies may round,
    leaving g within an ulp or so), at the price of one extra all-reduce of the gradients, which is why
    clipping is off by default.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    distributed = is_initialized() and dist.get_world_size(group) > 1
    if any(isinstance(g, DTensor) for g in grads):
        # FSDP2: the gradients are averaged already and each rank holds other rows, so the global
        # norm² is the SUM over ranks of each rank's local sum of squares (a scalar all_reduce)
        if not all(isinstance(g, DTensor) for g in grads):
            raise ValueError("gradients mix FSDP2 DTensors and plain tensors: shard every parameter, or none")
        grads = [g.to_local() for g in grads]
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
        if distributed:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        return _scale_to_norm_(grads, squares.sqrt(), max_norm)
    if distributed:
        # one flat buffer per dtype: a single collective instead of one per parameter
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
            offset = 0
            for g in same:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
    # sqrt of a sum of squares in fp32: torch's CPU vector_norm loses accuracy on large tensors
    total = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
    return _scale_to_norm_(grads, total, max_norm)


def _scale_to_norm_(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> torch.Tensor:
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total



class DTensorTraffic(TorchDispatchMode):
    """Counts the collectives that DTensor code runs inside `with DTensorTraffic(n) as t:` into
    `t.stats`, a CommStats with the same ring-model bytes as Comm's counters, so an outside
    optimizer on DTensors (torch.optim.Muon on FSDP2 parameters) can be compared byte for byte
    with ours. It lets DTensor desugar first (as torch's CommDebugMode does) and then sees the
    functional collectives on local tensors; `n` is the group size."""

    _RING = {"all_gather_into_tensor": lambda n: n - 1,        # × input bytes
             "reduce_scatter_tensor": lambda n: (n - 1) / n,   # × input bytes
             "all_reduce": lambda n: 2 * (n - 1) / n,
             "all_to_all_single": lambda n: (n - 1) / n}

    def __init__(self, world_size: int):
        super().__init__()
        self.n = world_size
        self.stats = CommStats()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "_overloadpacket", None)
        kind = packet._qualified_op_name.split("::")[-1] if packet is not None else ""
        if "c10d_functional" in getattr(packet, "_qualified_op_name", "") and kind in self._RING:
            size = args[0].numel() * args[0].element_size()
            self.stats.add(kind, size, self._RING[kind](self.n) * size)
        return out
