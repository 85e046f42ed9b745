"""One optimizer step of the training loop: grad_accum micro-batches forward and backward, the
optional clip, the optimizer step, and the loss of the whole batch for the log."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torch_impl.data.loader import DistributedTokenLoader
from torch_impl.optim.hybrid import HybridOptimizer
from torch_impl.optim.nonfinite import NonFiniteGradientError
from torch_impl.sharding.clip import clip_grad_norm_synchronized_
from torch_impl.sharding.comm import reduce_
from torch_impl.training.device import autocast, synchronize
from torch_impl.training.plan import Plan
from torch_impl.training.runtime import Dist


@dataclass(frozen=True)
class StepResult:
    loss: float               # mean loss over the step's global batch (every rank's micro-batches)
    grad_norm: float | None   # the norm before clipping (--grad-clip), else None
    stepped: bool             # False: a non-finite gradient skipped the step (--nonfinite skip)
    seconds: float            # wall time, device work included


def train_step(model, optimizer: HybridOptimizer, loader: DistributedTokenLoader, plan: Plan, d: Dist,
               step: int, reduce_in_backward: bool) -> StepResult:
    """Step `step` (1-based): each micro-batch's mean loss is scaled by 1/grad_accum so the accumulated
    gradient is the mean over them. `reduce_in_backward`: ZeRO-2 reduce_scatters during the last
    micro-batch's backward (sharding/backward_reduce.py); clipping needs whole gradients, so the caller
    turns it off with --grad-clip."""
    cfg = plan.cfg
    synchronize(d.device)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(plan.grad_accum):
        x, y = next(loader)
        with autocast(d.device):
            loss = model(x, y)
        loss_sum += loss.detach()
        loss = loss / plan.grad_accum
        if reduce_in_backward and micro == plan.grad_accum - 1:
            with optimizer.reduce_in_backward(loss):  # ZeRO-2: reduce_scatter as gradients appear
                loss.backward()
        else:
            loss.backward()
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = clip_grad_norm_synchronized_(model.parameters(), cfg.grad_clip).item()
    try:
        stepped = optimizer.step()
    except NonFiniteGradientError as e:
        raise NonFiniteGradientError(f"step {step}: {e.with_hint('--nonfinite skip')}") from None
    optimizer.zero_grad(set_to_none=True)
    # the loss of the whole batch, for the log (.item() also waits for the step to finish)
    loss_value = reduce_(loss_sum / plan.grad_accum, dist.ReduceOp.AVG).item()
    synchronize(d.device)
    return StepResult(loss_value, grad_norm, stepped, time.perf_counter() - t0)
