"""torch_impl.sharding.parallelize: activation checkpointing changes no gradient and no routing.
(FSDP2 itself runs in spawned ranks: tests/dist/test_fsdp2.py.)"""

from __future__ import annotations

import copy

import torch

from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import hybrid
from torch_impl.sharding.parallelize import apply_activation_checkpointing


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32))


def test_activation_checkpointing_gives_the_same_gradients_bitwise():
    """The recomputed forward runs the same ops on the same inputs, so every gradient is
    bit-identical (CPU kernels are deterministic); the wrappers really are in place."""
    ref = small_gpt()
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(model)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.transformer.h)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    ref(x, y).backward()
    model(x, y).backward()
    names = dict(model.named_parameters())
    assert len(names) == len(dict(ref.named_parameters()))
    for name, p in ref.named_parameters():
        parts = name.split(".")
        if name.startswith("transformer.h."):
            parts.insert(3, "_checkpoint_wrapped_module")
        wrapped = ".".join(parts)
        assert torch.equal(names[wrapped].grad, p.grad), name


def test_checkpointed_model_routes_every_block_matrix_to_muon():
    """Checkpoint wrappers rename the block parameters; the split works on canonical names."""
    model = small_gpt()
    apply_activation_checkpointing(model)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    opt = hybrid(model.named_parameters(), model_dim=32)
    muon = opt.optimizers["muon"]
    assert len(muon.param_groups[0]["params"]) == 6 * 3
    assert all("_checkpoint_wrapped_module" not in n for n in muon.param_groups[0]["param_names"])
