"""AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) as nanochat uses it: the math of
one step, and the optimizer around it.

Per parameter, at step t (1-based), with decoupled weight decay:

    P ← P·(1 − lr·wd)
    m ← lerp(m, g, 1 − β₁)          v ← β₂·v + (1 − β₂)·g²
    P ← P − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

This is torch.optim.AdamW's math and op order (.specs/muon_math.md); moments are fp32 and
bf16 parameters are updated in fp32 then rounded once. `adamw_step` is the only place the
math lives: the optimizer `AdamW` below calls it on whole parameters or on the rows of each
parameter that its rank holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from torch_impl.optim.base import ShardedOptimizer, default_group
from torch_impl.sharding.backward_reduce import Bucket, rows_bucket
from torch_impl.sharding.placement import Placement, Rows, ShardedRows, row_placements


@torch.no_grad()
def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place, on fp32 tensors. `steps[i]` is parameter i's step count t
    after this step (counts can differ when some parameters missed earlier gradients)."""
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in steps])


@dataclass(frozen=True)
class AdamWHyper:
    """One group's hyperparameters, as adamw_step takes them."""
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class AdamW(ShardedOptimizer):
    """AdamW (.specs/muon_math.md; math in adamw_step above): the same arguments and results as
    torch.optim.AdamW (non-amsgrad), plus fp32 math for bf16 parameters, the `nonfinite`
    policy, and ZeRO-2 over `process_group`: parameters of ≥ `shard_min_numel` elements are
    split by rows (gradients reduce_scattered, moments ≈ 1/N per rank, rows all_gathered),
    smaller ones are all_reduced in one flat buffer and updated whole on every rank. FSDP2
    DTensor parameters are updated on each rank's rows (their gradients are reduced already)."""

    kind = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 nonfinite="raise", process_group=None, track_stats=False, shard_min_numel: int = 1024,
                 grad_reduce_dtype=torch.float32):
        def check_hyper():
            if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
                raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, "
                                 f"eps={eps}, weight_decay={weight_decay}")

        self.shard_min_numel = shard_min_numel
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite=nonfinite, process_group=process_group, track_stats=track_stats,
                         grad_reduce_dtype=grad_reduce_dtype, check_hyper=check_hyper,
                         signature_extra=f"shard_min_numel={shard_min_numel}\n")

    def place(self) -> dict[torch.Tensor, Placement]:
        params = [p for g in self.param_groups for p in g["params"]]
        return row_placements(params, self.comm.world_size, self.shard_min_numel)

    def buckets(self) -> list[Bucket]:
        """One per row-sharded parameter (ZeRO-2), in group order; bucket_of maps them back."""
        buckets = [rows_bucket(p, self.placement(p), self.grad_reduce_dtype, self.comm.world_size)
                   for g in self.param_groups for p in g["params"] if isinstance(self.placement(p), Rows)]
        self.bucket_of = {bucket.params[0]: b for b, bucket in enumerate(buckets)}
        return buckets

    def param_state(self, p: torch.Tensor, like: torch.Tensor) -> dict:
        """fp32 moments shaped like `like` (the whole parameter, or this rank's rows)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        return state

    @staticmethod
    def hyper(group: dict) -> AdamWHyper:
        beta1, beta2 = group["betas"]
        return AdamWHyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"])

    @torch.no_grad()
    def update(self, keys: list[torch.Tensor], params: list[torch.Tensor],
               grads: list[torch.Tensor], group: dict) -> None:
        """`adamw_step` on tensors `params` (whole params or row slices) whose state is keyed
        by `keys`. Non-fp32 tensors are updated through fp32 copies."""
        states = [self.param_state(k, p) for k, p in zip(keys, params)]
        for s in states:
            s["step"] += 1
        work = [p if p.dtype == torch.float32 else p.float() for p in params]
        adamw_step(work, [g.float() for g in grads], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [int(s["step"]) for s in states],
                   **asdict(self.hyper(group)))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)
        if self.stats is not None:
            self.count_step_work(elements=sum(p.numel() for p in params))

    @torch.no_grad()
    def apply_update(self, grads_synced: bool = False) -> None:
        self.begin_update(grads_synced)
        comm, n, rank = self.comm, self.comm.world_size, self.comm.rank

        # 2. reduce: row-sharded parameters' gradients, zero-padded to c·N rows, each
        #    reduce_scattered; the replicated ones' gradients in one flat all_reduce (N > 1 only)
        sharded, small, fsdp = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if not self.has_grad(p):  # presence is identical on all ranks
                    continue
                place = self.placement(p)
                if isinstance(place, ShardedRows):  # FSDP2 reduced the gradient already
                    fsdp.append((group, p))
                elif isinstance(place, Rows):
                    sharded.append((group, p, place, self.reduction(self.bucket_of[p])))
                else:
                    small.append((group, p))
        small_grads = [p.grad for _, p in small]
        if small and n > 1:
            flat = torch.cat([p.grad.reshape(-1).float() for _, p in small])
            small_work = comm.all_reduce(flat)
            small_grads = [g.view_as(p) for g, (_, p) in zip(flat.split([p.numel() for _, p in small]), small)]

        # 3. update: per sharded parameter, wait, update this rank's rows, launch the gather
        gathers = []
        for group, p, place, reduction in sharded:
            recv = reduction.wait()
            start, end = place.local_rows(rank)
            if end > start:
                self.update([p], [p[start:end]], [recv[:end - start]], group)
            mine = torch.zeros(place.chunk, *p.shape[1:], dtype=p.dtype, device=p.device)
            mine[:end - start].copy_(p[start:end])
            out = torch.empty(place.chunk * n, *p.shape[1:], dtype=p.dtype, device=p.device)
            gathers.append((p, mine, out, comm.all_gather(out, mine)))  # `mine` kept alive to the wait

        #    FSDP2 parameters: this rank's rows of the parameter and of its reduced gradient
        for group in self.param_groups:
            mine = [p for grp, p in fsdp if grp is group and p.to_local().numel()]
            if mine:
                # planted-bug target (parity_tests/mutants.py)
                self.update(mine, [p.to_local() for p in mine], [p.grad.to_local() for p in mine], group)

        #    the replicated parameters: averaged gradients, updated whole on every rank
        if small:
            if n > 1:
                small_work.wait()
            for group in self.param_groups:
                mine = [(p, g) for (grp, p), g in zip(small, small_grads) if grp is group]
                if mine:
                    ps = [p for p, _ in mine]
                    self.update(ps, ps, [g for _, g in mine], group)

        # 4. gather: every rank takes the owners' rows
        for p, _mine, out, work in gathers:
            work.wait()
            # planted-bug target (parity_tests/mutants.py)
            p.copy_(out[:p.shape[0]])


class DistAdamW(AdamW):
    """AdamW (ZeRO-2) over a process group: `process_group=None` means the default group (if
    one is initialized; otherwise this process alone). Otherwise AdamW's arguments."""

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, process_group=default_group(process_group), **kwargs)
