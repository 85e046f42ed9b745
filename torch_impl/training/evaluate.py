"""Validation: mean per-token loss and bits per byte over a fixed slice of the held-out tokens."""

from __future__ import annotations

import numpy as np
import torch

from torch_impl.data.loader import DistributedTokenLoader, bits_per_byte, bpb_sums
from torch_impl.models.gpt import GPT
from torch_impl.sharding.comm import reduce_
from torch_impl.training.device import autocast
from torch_impl.training.plan import Plan
from torch_impl.training.runtime import Dist


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, plan: Plan, d: Dist, tok_bytes: torch.Tensor) -> dict:
    """Mean per-token loss and bits per byte over plan.eval_steps micro-batches of every rank, summed over
    ranks before dividing (so the result is the same whatever the number of ranks)."""
    cfg = plan.cfg
    loader = DistributedTokenLoader(tokens, cfg.device_batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # nats(bpb), bytes, loss sum, token count
    model.eval()
    for _ in range(plan.eval_steps):
        x, y = next(loader)
        with autocast(d.device):
            losses = model(x, y, loss_reduction="none")
        nats, nbytes = bpb_sums(losses, y, tok_bytes)
        sums += torch.stack([nats, nbytes.double(), losses.double().sum(), torch.tensor(y.numel(), device=d.device,
                                                                                           dtype=torch.float64)])
    model.train()
    nats, nbytes, loss_sum, count = reduce_(sums).tolist()
    return {"val_loss": loss_sum / count, "val_bpb": bits_per_byte(nats, nbytes)}
