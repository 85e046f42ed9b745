"""AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) as nanochat uses it.

Per parameter, at step t (1-based), with decoupled weight decay:

    P ← P·(1 − lr·wd)
    m ← lerp(m, g, 1 − β₁)          v ← β₂·v + (1 − β₂)·g²
    P ← P − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

This is torch.optim.AdamW's math and op order; moments are fp32 and bf16 parameters are
updated in fp32 then rounded once. `adamw_step` is the only place the math lives:
`AdamW` calls it on whole parameters, `DistAdamW` on each rank's shard.
"""

from __future__ import annotations

import math

import torch

from torch_impl.finite import check_policy
from torch_impl.optimizer_base import StepOptimizer


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


class AdamW(StepOptimizer):
    """Single-device AdamW on `adamw_step`; same arguments and results as torch.optim.AdamW
    (non-amsgrad), plus fp32 math for bf16 parameters and the `nonfinite` policy."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 nonfinite="raise"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.nonfinite = check_policy(nonfinite)

    def param_state(self, p: torch.Tensor, like: torch.Tensor) -> dict:
        """fp32 moments shaped like `like` (the whole parameter here, a shard in DistAdamW)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        return state

    @staticmethod
    def hyper(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"])

    @torch.no_grad()
    def update(self, keys: list[torch.Tensor], params: list[torch.Tensor],
               grads: list[torch.Tensor], group: dict) -> None:
        """AdamW on tensors `params` (whole params or shards) whose state is keyed by `keys`.
        Non-fp32 tensors are updated through fp32 copies."""
        states = [self.param_state(k, p) for k, p in zip(keys, params)]
        for s in states:
            s["step"] += 1
        work = [p if p.dtype == torch.float32 else p.float() for p in params]
        adamw_step(work, [g.float() for g in grads], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [int(s["step"]) for s in states],
                   **self.hyper(group))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    def apply_update(self, grads_synced: bool = False) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self.update(params, params, [p.grad for p in params], group)
