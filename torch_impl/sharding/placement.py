"""Where each parameter's optimizer work and state live: a small value per parameter.

The optimizers in torch_impl/optim/ run one code path at every world size N; what differs
between a single process and a sharded run is only this description, computed once from the
full parameter list (never from which gradients exist in a step, so state never moves):

    Replicated()        every rank updates the whole parameter and keeps its whole state
                        (N = 1; AdamW's small parameters, whose gradients are all_reduced)
    Owned(r)            rank r updates the whole parameter and keeps its state; the others
                        receive the new values (Muon at N > 1: it needs whole matrices;
                        owners balance the Newton-Schulz cost, owner_counts). On FSDP2
                        DTensors rank r computes the whole matrix's direction and every
                        rank applies it to its own rows (StackLayout.row_chunk)
    Rows(n_rows, c)     rank r updates rows [r·c, min((r+1)·c, n_rows)) of dim 0 and keeps
                        that slice of the state (AdamW's ZeRO-2 shards at N > 1)
    ShardedRows(n, c)   the same rows, of a parameter that is itself sharded (FSDP2 DTensor);
                        both are a RowSplit

The splits are those of ZeRO (Rajbhandari et al., https://arxiv.org/abs/1910.02054) as nanochat
uses them: c = ceil(n/N) after zero padding, the same uneven split as torch.chunk and DTensor's
Shard(0), which the checkpoint code relies on to save row shards as DTensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def chunk_rows(n_rows: int, world_size: int) -> int:
    """Rows (or matrices) per rank when `n_rows` are split evenly after zero padding:
    ceil(n/N). Rank r owns [r·c, min((r+1)·c, n)), possibly empty."""
    return max(1, math.ceil(n_rows / world_size))


@dataclass(frozen=True)
class Replicated:
    def holds(self, rank: int) -> bool:
        return True

    def local_rows(self, rank: int) -> None:
        return None


@dataclass(frozen=True)
class Owned:
    owner: int

    def holds(self, rank: int) -> bool:
        return rank == self.owner

    def local_rows(self, rank: int) -> None:
        return None


@dataclass(frozen=True)
class RowSplit:
    """What Rows and ShardedRows share: rank r has rows [r·c, min((r+1)·c, n_rows)) of dim 0.
    Neither is the other, so no isinstance check depends on the order it is asked in."""
    n_rows: int
    chunk: int

    def holds(self, rank: int) -> bool:
        start, end = self.local_rows(rank)
        return end > start

    def local_rows(self, rank: int) -> tuple[int, int]:
        """Rows [start, end) of dim 0 whose work and state live on `rank` (maybe empty)."""
        return min(rank * self.chunk, self.n_rows), min((rank + 1) * self.chunk, self.n_rows)


@dataclass(frozen=True)
class Rows(RowSplit):
    """A whole parameter whose update and state are split by rows (AdamW's ZeRO-2 shards)."""


@dataclass(frozen=True)
class ShardedRows(RowSplit):
    """The parameter itself is split by rows: an FSDP2 DTensor (fully_shard; Shard(0) on a 1-D
    mesh). Rank r holds rows local_rows(r) of the parameter and of its gradient, which FSDP has
    already reduced, so the update needs no collective of its own. The split is torch.chunk's,
    the same as Rows, so checkpoints treat both alike."""


Placement = Replicated | Owned | Rows | ShardedRows


def matrix_shape(shape) -> tuple[int, int]:
    """The (rows, cols) a parameter is laid out as in a stack: N-D as (shape[0], prod(rest))."""
    return shape[0], math.prod(shape[1:])


def sharded_rows(p: torch.Tensor, world_size: int) -> ShardedRows | None:
    """ShardedRows for an FSDP2 DTensor parameter, None for a plain tensor; ValueError for a
    DTensor laid out any other way."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor):
        return None
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} is laid out as {p.placements}; "
                         "only Shard(0) on a 1-D mesh (FSDP2's fully_shard) is supported")
    if p.device_mesh.size() != world_size:
        raise ValueError(f"a DTensor parameter lives on a mesh of {p.device_mesh.size()} ranks, the optimizer "
                         f"shards over {world_size}: pass the mesh's process group (or none: it is the default)")
    return ShardedRows(p.shape[0], chunk_rows(p.shape[0], world_size))


def same_shape_stacks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """All parameters grouped by (shape, dtype, device) in first-seen order: Muon batches a
    stack through one orthogonalizer call. At N > 1 every parameter is on this rank's one
    device, so every rank builds the same stacks in the same order."""
    stacks: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        stacks.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(stacks.values())


def ns_cost(shape, steps: int = 5) -> int:
    """Newton-Schulz work of one matrix, steps·s²·(2l + s) multiply-adds with s, l its short
    and long side: per iteration the s×s Gram matrix (s²·l), its polynomial (s³) and the
    product with X (s²·l)."""
    rows, cols = matrix_shape(shape)
    s, l = min(rows, cols), max(rows, cols)
    return steps * s * s * (2 * l + s)


def owner_counts(stacks: list[tuple[int, int]], world_size: int) -> list[list[int]]:
    """How many matrices of each stack every rank owns, given (K, cost per matrix) per stack.

    Longest processing time first (Graham 1969) within the layout the collectives need: a
    rank owns ⌊K/N⌋ or ⌈K/N⌉ matrices of a K-matrix stack, so a stack still moves as one
    reduce_scatter / all_gather of ⌈K/N⌉ matrices per rank, with no more padding than an even
    split. Stacks go in decreasing cost per matrix (ties: first seen first); each stack's
    K mod N remainder matrices go one each to the ranks with the least cost so far (ties: the
    lowest rank). No rank ever carries more than Σ ⌈K/N⌉·cost, the load of rank 0 under the
    count-based split this replaces (i // ⌈K/N⌉), and the remainders of different stacks no
    longer pile onto the low ranks. Deterministic: every rank computes the same counts."""
    load = [0] * world_size
    counts: list[list[int]] = [[] for _ in stacks]
    for k in sorted(range(len(stacks)), key=lambda k: (-stacks[k][1], k)):
        size, cost = stacks[k]
        base, extra = divmod(size, world_size)
        got = [base] * world_size
        for r in sorted(range(world_size), key=lambda r: (load[r], r))[:extra]:
            got[r] += 1
        for r in range(world_size):
            load[r] += got[r] * cost
        counts[k] = got
    return counts


@dataclass(frozen=True)
class StackLayout:
    """One same-shape stack as the collectives move it: a packed (chunk·N, rows, cols) buffer
    in which rank r's matrices sit at [r·chunk, r·chunk + count_r), in stack order.
    `slots[i]` is where params[i] goes; `cost` is one matrix's ns_cost. `row_chunk` is None
    for whole parameters; for FSDP2 DTensors it is the rows per rank of their Shard(0) split
    (rank r holds rows Rows(rows, row_chunk).local_rows(r) of every matrix)."""
    group_index: int
    params: tuple[torch.Tensor, ...]
    chunk: int
    slots: tuple[int, ...]
    cost: int
    row_chunk: int | None = None

    def owners(self) -> list[int]:
        """The rank that owns each matrix of the stack (slot // chunk), in stack order."""
        return [slot // self.chunk for slot in self.slots]


def muon_layouts(stacks: list[tuple[int, list[torch.Tensor]]], world_size: int,
                 steps_of_group: list[int]) -> tuple[list[StackLayout], dict[torch.Tensor, Placement]]:
    """Muon's owners (owner_counts: cost-balanced, each rank a contiguous run of each stack, in
    rank order) and the buffer layout that goes with them. One rank: everything Replicated.
    FSDP2 DTensor stacks get their row split (fsdp_rows; whole parameters and DTensors
    cannot be mixed)."""
    sharded = fsdp_rows([p for _, stack in stacks for p in stack], world_size)
    costs = [ns_cost(stack[0].shape, steps_of_group[gi]) for gi, stack in stacks]
    counts = owner_counts([(len(stack), cost) for (_, stack), cost in zip(stacks, costs)], world_size)
    layouts, placements = [], {}
    for (gi, stack), cost, per_rank in zip(stacks, costs, counts):
        chunk = max(per_rank)
        slots, i = [], 0
        for r, count in enumerate(per_rank):
            for j in range(count):
                # planted-bug target (parity_tests/mutants.py)
                placements[stack[i]] = Owned(r) if world_size > 1 else Replicated()
                slots.append(r * chunk + j)
                i += 1
        row_chunk = sharded[stack[0]].chunk if sharded else None
        layouts.append(StackLayout(gi, tuple(stack), chunk, tuple(slots), cost, row_chunk))
    return layouts, placements


def owner_loads(layouts: list[StackLayout], placements: dict[torch.Tensor, Placement],
                world_size: int) -> list[int]:
    """Newton-Schulz cost each rank carries per step (all matrices present)."""
    loads = [0] * world_size
    for layout in layouts:
        for p in layout.params:
            for r in range(world_size):
                if placements[p].holds(r):
                    loads[r] += layout.cost
    return loads


def fsdp_rows(params: list[torch.Tensor], world_size: int) -> dict[torch.Tensor, ShardedRows] | None:
    """ShardedRows of every parameter if they are all FSDP2 DTensors, None if none is;
    ValueError if some are (a parameter FSDP left unsharded would get another layout on every
    rank than its neighbours) or one is laid out other than Shard(0) over the world."""
    sharded = {p: sharded_rows(p, world_size) for p in params}
    if not any(sharded.values()):
        return None
    plain = [tuple(p.shape) for p, s in sharded.items() if s is None]
    if plain:
        raise ValueError(f"FSDP2 DTensor parameters mixed with {len(plain)} plain tensors (shapes {plain[:4]}): "
                         "shard every parameter with fully_shard, or none")
    return sharded


def row_placements(params: list[torch.Tensor], world_size: int, shard_min_numel: int) -> dict[torch.Tensor, Placement]:
    """AdamW: parameters of ≥ `shard_min_numel` elements (and ≥ 1 dim) are split by rows at
    N > 1; smaller ones (biases, gains, scalars) are not worth a collective each. FSDP2
    DTensor parameters are ShardedRows (fsdp_rows)."""
    sharded = fsdp_rows(params, world_size)
    if sharded:
        return sharded
    out = {}
    for p in params:
        if world_size > 1 and p.ndim >= 1 and p.numel() >= shard_min_numel:
            out[p] = Rows(p.shape[0], chunk_rows(p.shape[0], world_size))
        else:
            out[p] = Replicated()
    return out
