"""Parallelism and memory savers applied to the GPT from outside, as torchtitan does: the model
file (torch_impl/models/gpt.py) knows nothing of them, and the optimizer sees only what they produce.

    apply_activation_checkpointing(model)   each transformer block recomputes its forward
                                            during backward (activations of one block kept
                                            instead of all: Chen et al. 2016,
                                            https://arxiv.org/abs/1604.06174)
    apply_fsdp(model, mesh, ...)            FSDP2 (fully_shard): every parameter becomes a
                                            DTensor sharded by rows over the mesh; each block
                                            is gathered for its forward / backward and its
                                            gradients reduce_scattered as soon as they are
                                            ready (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html)

The optimizers (torch_impl/optim/) take FSDP2's DTensors as they are: AdamW updates each
rank's rows, Muon moves rows to each matrix's owner and back (sharding/row_owners.py).

Checkpoint wrappers rename modules (`transformer.h.0._checkpoint_wrapped_module.attn...`);
the optimizer split works on canonical names (optim/hybrid.py canonical_name), so they route alike.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each block of `model.transformer.h` in a non-reentrant checkpoint wrapper (the
    one torchtitan uses): its forward runs again in backward instead of keeping its
    activations. Gradients are unchanged (the same ops run on the same inputs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """fully_shard each block, then the root (the embedding and lm_head join the root's
    group), on a 1-D `mesh`. `param_dtype` (e.g. bf16 on CUDA): the dtype parameters are
    gathered and computed in, while the sharded fp32 parameters stay the master weights the
    optimizer updates; gradients are reduced in `reduce_dtype` (fp32 by default)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp needs a 1-D device mesh, got {mesh.ndim} dims")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
