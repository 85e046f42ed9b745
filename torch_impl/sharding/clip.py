"""Gradient clipping on the synchronised (rank-averaged) gradient: `clip_grad_norm_synchronized_`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torch_impl.sharding.comm import reduce_, world


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
    if any(isinstance(g, DTensor) for g in grads):
        # FSDP2: the gradients are averaged already and each rank holds other rows, so the global
        # norm² is the SUM over ranks of each rank's local sum of squares (a scalar all_reduce)
        if not all(isinstance(g, DTensor) for g in grads):
            raise ValueError("gradients mix FSDP2 DTensors and plain tensors: shard every parameter, or none")
        grads = [g.to_local() for g in grads]
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
        reduce_(squares, dist.ReduceOp.SUM, group)
        return _scale_to_norm_(grads, squares.sqrt(), max_norm)
    if world(group)[1] > 1:
        # one flat buffer per dtype: a single collective instead of one per parameter
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            reduce_(flat, dist.ReduceOp.AVG, group)
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
