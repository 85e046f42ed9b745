"""AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) as nanochat uses it.

Per parameter, at step t (1-based), with decoupled weight decay:

    P ← P·(1 − lr·wd)
    m ← lerp(m, g, 1 − β₁)          v ← β₂·v + (1 − β₂)·g²
    P ← P − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

This is torch.optim.AdamW's math and op order (.specs/muon_math.md); moments are fp32 and
bf16 parameters are updated in fp32 then rounded once. `adamw_step` is the only place the
math lives: the optimizer in torch_impl/optim/base.py calls it on whole parameters or on the rows
of each parameter that its rank holds.
"""

from __future__ import annotations

import math

import torch


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
