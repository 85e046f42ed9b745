"""Where each parameter's optimizer work and state live: a small value per parameter.

The optimizers in torch_impl/optim.py run one code path at every world size N; what differs
between a single process and a sharded run is only this description, computed once from the
full parameter list (never from which gradients exist in a step, so state never moves):

    Replicated()        every rank updates the whole parameter and keeps its whole state
                        (N = 1; AdamW's small parameters, whose gradients are all_reduced)
    Owned(r)            rank r updates the whole parameter and keeps its state; the others
                        receive the new values (Muon at N > 1: it needs whole matrices)
    Rows(n_rows, c)     rank r updates rows [r·c, min((r+1)·c, n_rows)) of dim 0 and keeps
                        that slice of the state (AdamW's ZeRO-2 shards at N > 1)

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
class Rows:
    n_rows: int
    chunk: int

    def holds(self, rank: int) -> bool:
        start, end = self.local_rows(rank)
        return end > start

    def local_rows(self, rank: int) -> tuple[int, int]:
        """Rows [start, end) of dim 0 whose work and state live on `rank` (maybe empty)."""
        return min(rank * self.chunk, self.n_rows), min((rank + 1) * self.chunk, self.n_rows)


Placement = Replicated | Owned | Rows


def same_shape_stacks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """All parameters grouped by (shape, dtype, device) in first-seen order: Muon batches a
    stack through one orthogonalizer call. At N > 1 every parameter is on this rank's one
    device, so every rank builds the same stacks in the same order."""
    stacks: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        stacks.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(stacks.values())


def owner_placements(stacks: list[list[torch.Tensor]], world_size: int) -> dict[torch.Tensor, Placement]:
    """Muon: matrix i of a K-matrix stack is owned by rank i // ceil(K/N); N = 1 replicates."""
    if world_size == 1:
        return {p: Replicated() for stack in stacks for p in stack}
    out = {}
    for stack in stacks:
        c = chunk_rows(len(stack), world_size)
        # planted-bug target (parity_tests/mutants.py)
        out.update({p: Owned(i // c) for i, p in enumerate(stack)})
    return out


def row_placements(params: list[torch.Tensor], world_size: int, shard_min_numel: int) -> dict[torch.Tensor, Placement]:
    """AdamW: parameters of ≥ `shard_min_numel` elements (and ≥ 1 dim) are split by rows at
    N > 1; smaller ones (biases, gains, scalars) are not worth a collective each."""
    out = {}
    for p in params:
        if world_size > 1 and p.ndim >= 1 and p.numel() >= shard_min_numel:
            out[p] = Rows(p.shape[0], chunk_rows(p.shape[0], world_size))
        else:
            out[p] = Replicated()
    return out
