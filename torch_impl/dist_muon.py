"""DistMuon: Muon with each matrix's work and state on one rank (ZeRO-style sharding).

The scheme follows nanochat's DistMuon (https://github.com/karpathy/nanochat, nanochat/muon.py)
and ZeRO stage 1/2's partitioning of optimizer state (Rajbhandari et al., arXiv 1910.02054).
Per parameter group, parameters are stacked by (shape, dtype, device) in the same order on
every rank. For a stack of K matrices and world size N, with c = ceil(K/N):

    1. pad to K_pad = c·N zero matrices; reduce_scatter(AVG) the fp32 gradients, so rank r
       receives the averaged gradients of matrices [r·c, (r+1)·c) (a rank may own none);
    2. the owner runs Muon.step_stack (muon_step: the one copy of the math) on them; the
       momentum / NorMuon state of a matrix exists only on its owner;
    3. all_gather the owned (updated) parameters into (K_pad, rows, cols) and copy them
       into every rank's parameters.

Communication per step: reduce_scatter + all_gather send 2·(N−1)/N of the stacks' bytes
per rank (the same as one all_reduce of the gradients), while Newton-Schulz work per rank
drops from K to ceil(K/N) matrices. All reduce_scatters are launched first; then stack by
stack we wait, compute, and launch that stack's all_gather, so communication of one stack
overlaps the orthogonalization of the next. Gradients are reduced in fp32 (Muon works in
fp32 anyway; bf16 gradients are averaged exactly), parameters are gathered in their dtype.

Ownership is a function of the full parameter list (not of which gradients exist this
step), so a matrix's state never moves between ranks. World size 1 (or no process group)
runs Muon's own step: no collectives.

Failure modes are collective, so every rank raises together instead of hanging: mismatched
parameter lists across ranks or parameters on several devices (checked at construction by
a small all_gather), a gradient present on some ranks only, and non-finite gradients
(`nonfinite_names`, run once per step by StepOptimizer.step or HybridOptimizer). Anything
else (a crashed rank) is bounded by the process
group's timeout: create it with a finite one (see torch_impl/distributed.py).
"""

from __future__ import annotations

import torch

from torch_impl.distributed import Comm, chunk_rows, init_collectively, sync_grad_flags
from torch_impl.muon import Muon, as_matrix_shape


def static_stacks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """All parameters of a group, grouped by (shape, dtype, device type) in first-seen order.
    Unlike muon.stack_groups this ignores which gradients exist, so ownership never moves,
    and it keys on the device *type*: rank r's parameters live on cuda:r, yet every rank
    must build the same stacks in the same order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((tuple(p.shape), p.dtype, p.device.type), []).append(p)
    return list(groups.values())


class DistMuon(Muon):
    """Muon sharded over a process group; takes Muon's arguments, plus

    process_group: the group to shard over (None: the default group, if initialized);
    track_stats: count bytes per collective and matrices orthogonalized in `self.stats`
    (a torch_impl.distributed.CommStats; None when off)."""

    def __init__(self, params, *args, process_group=None, track_stats: bool = False, **kwargs):
        params = list(params)
        self.comm = Comm(process_group, track_stats)
        init_collectively(self, lambda: super(DistMuon, self).__init__(params, *args, **kwargs), "DistMuon")

    @property
    def stats(self):
        return self.comm.stats

    def owners(self, group: dict) -> dict[torch.Tensor, int]:
        """Rank that owns each parameter of `group` (and its state) at this world size."""
        return muon_owners(group["params"], self.comm.world_size)

    def nonfinite_names(self, param_groups: list[dict]) -> list[str]:
        """Names of parameters whose gradient is non-finite on any rank (identical on every
        rank); raises on every rank if gradients are present on some ranks only."""
        return sync_grad_flags(self.comm, param_groups, check_finite=True)

    def apply_update(self, grads_synced: bool = False) -> None:
        if self.stats is not None:
            self.stats.steps += 1
        if self.comm.world_size == 1:
            if self.stats is not None:
                self.stats.matrices += sum(p.grad is not None for g in self.param_groups for p in g["params"])
            super().apply_update()
            return
        if not grads_synced:
            sync_grad_flags(self.comm, self.param_groups, check_finite=False)  # presence only
        n, rank = self.comm.world_size, self.comm.rank

        # 1. launch every reduce_scatter before any compute
        pending = []
        for group in self.param_groups:
            hp = self.hyper(group)
            for params in static_stacks(group["params"]):
                if all(p.grad is None for p in params):  # presence is identical on all ranks
                    continue
                rows, cols = as_matrix_shape(params[0].shape)
                c = chunk_rows(len(params), n)
                send = torch.zeros(c * n, rows, cols, dtype=torch.float32, device=params[0].device)
                for i, p in enumerate(params):
                    if p.grad is not None:
                        send[i].copy_(p.grad.reshape(rows, cols))
                recv = torch.empty(c, rows, cols, dtype=torch.float32, device=send.device)
                pending.append((hp, params, c, recv, self.comm.reduce_scatter(recv, send)))

        # 2. per stack: wait for its gradients, step the owned matrices, launch the gather
        gathers = []
        for hp, params, c, recv, work in pending:
            work.wait()
            owned = params[rank * c:(rank + 1) * c]
            active = [j for j, p in enumerate(owned) if p.grad is not None]
            if active:
                grads = recv[:len(owned)] if len(active) == len(owned) else recv[active]
                self.step_stack([owned[j] for j in active], grads, hp)
                if self.stats is not None:
                    self.stats.matrices += len(active)
            rows, cols = recv.shape[-2:]
            send = torch.zeros(c, rows, cols, dtype=params[0].dtype, device=recv.device)
            for j, p in enumerate(owned):
                send[j].copy_(p.reshape(rows, cols))
            out = torch.empty(c * n, rows, cols, dtype=send.dtype, device=send.device)
            gathers.append((params, out, self.comm.all_gather(out, send)))

        # 3. every rank takes the owners' parameters
        for params, out, work in gathers:
            work.wait()
            for i, p in enumerate(params):
                p.copy_(out[i].view_as(p))


def muon_owners(params: list[torch.Tensor], world_size: int) -> dict[torch.Tensor, int]:
    owners = {}
    for stack in static_stacks(params):
        c = chunk_rows(len(stack), world_size)
        for i, p in enumerate(stack):
            owners[p] = i // c
    return owners
