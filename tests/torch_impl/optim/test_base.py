"""torch_impl.optim.base: the Muon, AdamW and HybridOptimizer classes on one process (stacking,
N-D parameters, bf16, state_dict, the hybrid split, the non-finite policy). The math of a step
is tested in test_muon.py / test_adamw.py, the sharded runs in tests/dist."""

from __future__ import annotations

import copy

import pytest
import torch

from torch_impl.optim.base import AdamW, HybridOptimizer, Muon, canonical_name, hybrid, label_param


def make_params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


KW = dict(lr=0.02, weight_decay=0.1, normuon_beta2=0.95, ns_dtype=torch.float32)


def test_stacked_step_equals_one_group_per_parameter():
    """Stacking same-shape matrices into one batched NS call must not mix them."""
    shapes = [(16, 8)] * 3 + [(8, 16)] * 2
    a, b = make_params(shapes), make_params(shapes)
    stacked = Muon(a, **KW)
    separate = Muon([{"params": [p]} for p in b], **KW)
    for step in range(3):
        set_grads(a, step), set_grads(b, step)
        stacked.step(), separate.step()
    for p, q in zip(a, b):
        # batched vs single bmm: same math, BLAS blocking may differ by fp32 rounding only
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_nd_parameters_are_orthogonalized_as_matrices_and_keep_their_shape():
    conv, flat = make_params([(4, 3, 2, 2)]), make_params([(4, 12)])
    flat[0].data.copy_(conv[0].data.reshape(4, 12))
    o1, o2 = Muon(conv, **KW), Muon(flat, **KW)
    for step in range(2):
        set_grads(conv, step)
        flat[0].grad = conv[0].grad.reshape(4, 12).clone()
        o1.step(), o2.step()
    assert conv[0].shape == (4, 3, 2, 2)
    assert torch.equal(conv[0].detach().reshape(4, 12), flat[0].detach())


def test_gradients_are_not_mutated_and_params_without_grad_are_skipped():
    p, q = make_params([(8, 8), (8, 8)])
    opt = Muon([p, q], **KW)
    set_grads([p], 0)
    before_grad, before_q = p.grad.clone(), q.detach().clone()
    opt.step()
    assert torch.equal(p.grad, before_grad)
    assert torch.equal(q, before_q) and q not in opt.state


def test_state_dict_round_trip_continues_identically():
    a = make_params([(8, 16), (16, 8)])
    opt = Muon(a, **KW)
    set_grads(a, 0)
    opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = Muon(b, **KW)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in (1, 2):
        set_grads(a, step), set_grads(b, step)
        opt.step(), opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bf16_parameters_update_through_fp32_and_stay_bf16():
    lo = make_params([(16, 16)], dtype=torch.bfloat16)
    hi = [torch.nn.Parameter(lo[0].detach().float())]
    o_lo, o_hi = Muon(lo, **KW), Muon(hi, **KW)
    set_grads(lo, 0)
    hi[0].grad = lo[0].grad.float()
    o_lo.step(), o_hi.step()
    assert lo[0].dtype == torch.bfloat16 and o_lo.state[lo[0]]["momentum_buffer"].dtype == torch.float32
    # identical fp32 math on identical values; the bf16 run only rounds the result once
    torch.testing.assert_close(lo[0].float(), hi[0].detach().bfloat16().float(), rtol=0, atol=0)


def test_adamw_bf16_matches_fp32_math_rounded_once():
    lo = [torch.nn.Parameter(torch.randn(32).bfloat16())]
    hi = [torch.nn.Parameter(lo[0].detach().float())]
    a, b = AdamW(lo, lr=0.01), AdamW(hi, lr=0.01)
    set_grads(lo, 0)
    hi[0].grad = lo[0].grad.float()
    a.step(), b.step()
    assert torch.equal(lo[0].float(), hi[0].detach().bfloat16().float())


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


@pytest.mark.parametrize("cls", [Muon, AdamW])
def test_load_state_dict_keeps_fp32_state_of_bf16_params(cls):
    """torch.optim.Optimizer.load_state_dict casts state to the param dtype; the saved fp32
    moments of bf16 params must come back as fp32 (and as copies, not the dict's tensors)."""
    kw = dict(ns_dtype=torch.float32) if cls is Muon else {}
    a = make_params([(8, 8)], dtype=torch.bfloat16)
    opt = cls(a, **kw)
    set_grads(a, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt2 = cls(b, **kw)
    opt2.load_state_dict(saved)
    for k, v in saved["state"][0].items():
        assert opt2.state[b[0]][k].dtype == v.dtype, k
        assert opt2.state[b[0]][k] is not v


# ---- bad input and the non-finite policy (the JAX side: tests/jax_reference/optim/test_muon.py) ----

def test_muon_rejects_vectors_naming_them():
    with pytest.raises(ValueError, match="bias.*\\(7,\\)|\\(7,\\).*bias"):
        Muon([("layer.bias", torch.nn.Parameter(torch.zeros(7)))])


def test_unknown_orthogonalizer_lists_valid_names():
    with pytest.raises(ValueError, match="newton_schulz.*polar_express|polar_express.*newton_schulz"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], orthogonalizer="svd")


def test_nonfinite_gradient_raises_naming_the_parameter_before_writing_anything():
    good, bad = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([("good.w", good), ("bad.w", bad)], ns_dtype=torch.float32)
    good.grad, bad.grad = torch.ones(4, 4), torch.full((4, 4), float("nan"))
    with pytest.raises(ValueError, match="bad.w"):
        opt.step()
    assert torch.equal(good, torch.ones(4, 4)) and len(opt.state) == 0


def test_nonfinite_skip_leaves_everything_untouched():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([p], ns_dtype=torch.float32, nonfinite="skip")
    p.grad = torch.full((4, 4), float("inf"))
    opt.step()
    assert torch.equal(p, torch.ones(4, 4)) and len(opt.state) == 0


# ---- construction-time checks and add_param_group ---------------------------------------------

def test_add_param_group_at_one_rank_updates_the_new_parameters_like_a_fresh_optimizer():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16, 8))
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt = Muon([a], ns_dtype=torch.float32)
    opt.add_param_group(dict(params=[b]))
    ref = Muon([dict(params=[a2]), dict(params=[b2])], ns_dtype=torch.float32)
    b_before = b.detach().clone()
    for p, q in ((a, a2), (b, b2)):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(b, b_before) and b in opt.state


def test_add_param_group_rejects_a_vector_in_muon():
    opt = Muon([torch.nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match="≥ 2 dims"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(4))]))


def test_orthogonalizer_with_the_wrong_signature_fails_at_construction():
    def old_style(X, steps, compute_dtype, check_finite):
        return X
    with pytest.raises(ValueError, match="steps, eps, compute_dtype"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], orthogonalizer=old_style)


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
