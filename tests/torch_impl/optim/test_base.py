"""torch_impl.optim.base: what the Muon and AdamW classes share, on one process (the phases of
step(), stacking, N-D parameters, bf16, state_dict, the non-finite policy, add_param_group). The
math of a step is tested in test_muon.py / test_adamw.py, the hybrid in test_hybrid.py, the
sharded runs in tests/dist."""

from __future__ import annotations

import copy

import pytest
import torch

from torch_impl.optim import AdamW, Muon
from torch_impl.optim.base import ShardedOptimizer, default_group, mesh_group
from torch_impl.sharding.placement import Replicated


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


class Recording(ShardedOptimizer):
    """The smallest optimizer kind: every parameter replicated, apply_update records its calls."""
    kind = "recording"

    def __init__(self, params, nonfinite="raise"):
        self.calls = []
        super().__init__(params, {}, nonfinite=nonfinite, process_group=None, track_stats=False)

    def place(self):
        return {p: Replicated() for g in self.param_groups for p in g["params"]}

    def apply_update(self, grads_synced: bool = False) -> None:
        self.calls.append(grads_synced)


def test_step_runs_the_check_then_the_update_of_a_kind():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Recording([p])
    p.grad = torch.ones(3)
    assert opt.step(closure=lambda: torch.tensor(2.0)) == 2.0  # the closure's loss comes back
    assert opt.step(check_finite=False) is None
    assert opt.calls == [True, False]  # phase 1 ran (True) / was the caller's (False)
    p.grad = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match=r"param\[0\]"):
        opt.step()
    skipping = Recording([p], nonfinite="skip")
    skipping.step()
    assert opt.calls == [True, False] and skipping.calls == []  # raised / skipped before any update


def test_without_a_process_group_an_optimizer_is_local():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert mesh_group(params) is None and mesh_group([{"params": params}]) is None  # no DTensor, no mesh
    assert default_group(None) is None  # no process group initialized in this process
    opt = Recording(params)
    assert opt.comm.is_local and opt.comm.world_size == 1 and opt.reducer.buckets == []
