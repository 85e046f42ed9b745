"""torch_impl.optim.hybrid: nanochat's split (labels, width-scaled AdamW lrs, canonical names under
module wrappers) and HybridOptimizer (one policy, one group, one non-finite check for both parts)."""

from __future__ import annotations

import pytest
import torch

from torch_impl.optim import AdamW, HybridOptimizer, Muon, hybrid
from torch_impl.optim.hybrid import canonical_name, label_param


def test_hybrid_labels_follow_nanochat():
    assert label_param("transformer.h.3.attn.c_q.weight", (8, 8)) == "muon"
    assert label_param("transformer.wte.weight", (10, 8)) == "embedding"
    assert label_param("lm_head.weight", (10, 8)) == "unembedding"
    assert label_param("transformer.h.3.attn.gain", (8,)) == "scalar"
    assert label_param("resid_lambdas", (4, 4)) == "scalar"  # 2-D outside the blocks


def test_hybrid_never_sends_vectors_to_muon_and_scales_adam_lrs_with_width():
    params = {"transformer.h.0.w": torch.nn.Parameter(torch.zeros(4, 4)),
              "transformer.h.0.b": torch.nn.Parameter(torch.zeros(4)),
              "transformer.wte.weight": torch.nn.Parameter(torch.zeros(5, 4))}
    opt = hybrid(params.items(), embedding_lr=0.2, model_dim=3072)
    muon_params = [p for g in opt.optimizers["muon"].param_groups for p in g["params"]]
    assert all(p.ndim >= 2 for p in muon_params) and len(muon_params) == 1
    emb = [g for g in opt.optimizers["adamw"].param_groups if g["label"] == "embedding"][0]
    assert emb["lr"] == pytest.approx(0.2 * 0.5)  # (3072/768)^-½ = ½
    opt.set_lr_multiplier(0.1)
    assert emb["lr"] == pytest.approx(0.01)


def test_hybrid_nonfinite_raise_leaves_both_optimizers_untouched():
    params = {"transformer.h.0.w": torch.nn.Parameter(torch.ones(4, 4)),
              "lm_head.weight": torch.nn.Parameter(torch.ones(5, 4))}
    opt = hybrid(params.items(), ns_dtype=torch.float32)
    params["transformer.h.0.w"].grad = torch.ones(4, 4)
    params["lm_head.weight"].grad = torch.full((5, 4), float("nan"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        opt.step()
    assert torch.equal(params["transformer.h.0.w"], torch.ones(4, 4))


def test_hybrid_optimizer_needs_one_policy_and_one_group():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        HybridOptimizer(Muon([p]), AdamW([q]), nonfinite="rasie")
    with pytest.raises(ValueError, match="one policy"):
        HybridOptimizer(Muon([p], nonfinite="skip"), AdamW([q]), nonfinite="raise")
    with pytest.raises(ValueError, match="at least one"):
        HybridOptimizer(None, None)


# ---- the split survives module wrappers (canonical names) -------------------------------------

@pytest.mark.parametrize("wrapped,canonical", [
    ("_orig_mod.transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_q.weight"),          # torch.compile
    ("transformer.h.0._checkpoint_wrapped_module.attn.c_q.weight", "transformer.h.0.attn.c_q.weight"),
    ("module.lm_head.weight", "lm_head.weight"),                                                 # DDP
    ("_fsdp_wrapped_module.transformer.wte.weight", "transformer.wte.weight"),
    ("transformer.h.0.mlp.module.weight", "transformer.h.0.mlp.module.weight"),  # only a leading "module."
])
def test_canonical_name_strips_wrapper_segments(wrapped, canonical):
    assert canonical_name(wrapped) == canonical
    assert label_param(wrapped, (8, 8)) == label_param(canonical, (8, 8))


def tiny_gpt():
    from torch_impl.models.gpt import GPT, GPTConfig
    return GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))


def test_compiled_and_checkpoint_wrapped_models_split_like_the_plain_one():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    plain = tiny_gpt()
    wrapped = tiny_gpt()
    for i, block in enumerate(wrapped.transformer.h):
        wrapped.transformer.h[i] = checkpoint_wrapper(block)
    # torch.compile's OptimizedModule names its parameters "_orig_mod.<name>" (the suite runs with
    # TORCHDYNAMO_DISABLE=1, under which torch.compile returns the model itself, so build the names)
    compiled = [("_orig_mod." + n, p) for n, p in tiny_gpt().named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())

    def split(model):
        named = model if isinstance(model, list) else model.named_parameters()
        opt = hybrid(named, model_dim=64)
        return {part: [(g.get("label"), g["param_names"]) for g in o.param_groups] if part == "adamw"
                else [n for g in o.param_groups for n in g["param_names"]] for part, o in opt.optimizers.items()}

    assert split(wrapped) == split(compiled) == split(plain)
    assert len(split(plain)["muon"]) == 2 * 6  # c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj per block


def test_block_parameters_that_cannot_go_to_muon_raise():
    # what a flattening wrapper (ZeRO-3 / FSDP1 flat parameters) presents: 1-D block parameters
    flat = [(f"transformer.h.{i}.flat_param", torch.nn.Parameter(torch.zeros(0))) for i in range(2)]
    flat.append(("lm_head.weight", torch.nn.Parameter(torch.zeros(4, 4))))
    with pytest.raises(ValueError, match="none can go to Muon"):
        hybrid(flat)
    assert hybrid(flat, matrix_optimizer="adamw").optimizers.keys() == {"adamw"}  # the explicit opt-out
