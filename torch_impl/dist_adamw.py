"""DistAdamW: AdamW with ZeRO-2 sharding of gradients and optimizer state.

ZeRO stage 2 (Rajbhandari et al., arXiv 1910.02054), as nanochat's DistAdamW does it
(https://github.com/karpathy/nanochat, nanochat/adamw.py). For world size N:

- a parameter with numel ≥ `shard_min_numel` (and ≥ 1 dim) is split along dim 0: pad dim 0
  to a multiple of N (c = ceil(rows/N) rows per rank; a rank may own none when rows < N),
  reduce_scatter(AVG) the fp32 gradient, update the owned rows with AdamW.update (adamw_step:
  the one copy of the math) with moments shaped like the slice (≈1/N of the state per
  rank), then all_gather the slices back into every rank's parameter;
- smaller parameters (biases, gains, scalars) are not worth a collective each: their
  gradients go through one flat all_reduce(AVG) and every rank updates them whole
  (replicated state).

The reduce_scatters and the small-gradient all_reduce are all launched before any compute;
each shard's all_gather is launched as soon as its update is done. Gradients are reduced in
fp32 (AdamW works in fp32; bf16 gradients are averaged exactly). World size 1 (or no process
group) runs AdamW's own step. Errors are collective as in DistMuon (see dist_muon.py).
"""

from __future__ import annotations

import torch

from torch_impl.adamw import AdamW
from torch_impl.distributed import Comm, chunk_rows, init_collectively, owned_range, sync_grad_flags


class DistAdamW(AdamW):
    """AdamW sharded over a process group; takes AdamW's arguments, plus

    shard_min_numel: parameters at least this large are sharded (ZeRO-2), smaller ones are
    all-reduced and replicated; process_group, track_stats: as in DistMuon."""

    def __init__(self, params, *args, shard_min_numel: int = 1024, process_group=None,
                 track_stats: bool = False, **kwargs):
        params = list(params)
        self.comm = Comm(process_group, track_stats)
        self.shard_min_numel = shard_min_numel
        init_collectively(self, lambda: super(DistAdamW, self).__init__(params, *args, **kwargs),
                          "DistAdamW", f"shard_min_numel={shard_min_numel}\n")

    @property
    def stats(self):
        return self.comm.stats

    def is_sharded(self, p: torch.Tensor, world_size: int | None = None) -> bool:
        n = self.comm.world_size if world_size is None else world_size
        return n > 1 and p.ndim >= 1 and p.numel() >= self.shard_min_numel

    def shard(self, p: torch.Tensor, rank: int | None = None, world_size: int | None = None):
        """Rows [start, end) of `p` whose state lives on `rank`, or None if `p` is replicated."""
        rank = self.comm.rank if rank is None else rank
        n = self.comm.world_size if world_size is None else world_size
        return owned_range(p.shape[0], rank, n) if self.is_sharded(p, n) else None

    def nonfinite_names(self, param_groups: list[dict]) -> list[str]:
        """Global, like DistMuon.nonfinite_names (one all_reduce, presence checked too)."""
        return sync_grad_flags(self.comm, param_groups, check_finite=True)

    def apply_update(self, grads_synced: bool = False) -> None:
        if self.stats is not None:
            self.stats.steps += 1
        if self.comm.world_size == 1:
            if self.stats is not None:
                self.stats.elements += sum(p.numel() for g in self.param_groups
                                           for p in g["params"] if p.grad is not None)
            super().apply_update()
            return
        if not grads_synced:
            sync_grad_flags(self.comm, self.param_groups, check_finite=False)  # presence only
        n = self.comm.world_size

        # 1. launch every collective before any compute
        sharded, small = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # presence is identical on all ranks
                    continue
                if not self.is_sharded(p):
                    small.append((group, p))
                    continue
                c = chunk_rows(p.shape[0], n)
                send = torch.zeros(c * n, *p.shape[1:], dtype=torch.float32, device=p.device)
                send[:p.shape[0]].copy_(p.grad)
                recv = torch.empty(c, *p.shape[1:], dtype=torch.float32, device=p.device)
                sharded.append((group, p, c, recv, self.comm.reduce_scatter(recv, send)))
        if small:
            flat = torch.cat([p.grad.reshape(-1).float() for _, p in small])
            small_work = self.comm.all_reduce(flat)

        # 2. per sharded parameter: wait, update the owned rows, launch the gather
        gathers = []
        for group, p, c, recv, work in sharded:
            work.wait()
            start, end = self.shard(p)
            if end > start:
                self.update([p], [p[start:end]], [recv[:end - start]], group)
                if self.stats is not None:
                    self.stats.elements += p[start:end].numel()
            send = torch.zeros(c, *p.shape[1:], dtype=p.dtype, device=p.device)
            send[:end - start].copy_(p[start:end])
            out = torch.empty(c * n, *p.shape[1:], dtype=p.dtype, device=p.device)
            gathers.append((p, out, self.comm.all_gather(out, send)))

        # 3. small parameters: averaged gradients, updated whole on every rank
        if small:
            small_work.wait()
            grads = flat.split([p.numel() for _, p in small])
            for group in self.param_groups:
                mine = [(p, g.view_as(p)) for (grp, p), g in zip(small, grads) if grp is group]
                if mine:
                    ps = [p for p, _ in mine]
                    self.update(ps, ps, [g for _, g in mine], group)
                    if self.stats is not None:
                        self.stats.elements += sum(p.numel() for p in ps)

        for p, out, work in gathers:
            work.wait()
            p.copy_(out[:p.shape[0]])
