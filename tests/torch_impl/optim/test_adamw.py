"""torch_impl.optim.adamw: the math of one AdamW step (`adamw_step`) on its own. The optimizer class
around it is tested in test_base.py, its sharded runs in tests/dist, and the class against
torch.optim.AdamW and the JAX reference in parity_tests/test_muon_parity.py."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_impl.optim.adamw import adamw_step

SHAPES = [(7,), (8, 8), (3, 4, 5), ()]


def torch_adamw_fp64(p, grads, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's update rule in numpy fp64 over `grads`; returns each step's P' − P."""
    p = np.asarray(p, np.float64)
    m = v = np.zeros_like(p)
    deltas = []
    for t, g in enumerate((np.asarray(g, np.float64) for g in grads), start=1):
        before = p
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1**t)) / (np.sqrt(v) / np.sqrt(1 - beta2**t) + eps)
        deltas.append(p - before)
    return deltas


@given(seed=st.integers(0, 2**32 - 1), shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
       lr=st.sampled_from([1e-3, 0.05]), betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
       eps=st.sampled_from([1e-8, 1e-10]), weight_decay=st.sampled_from([0.0, 0.1]))
def test_three_steps_match_the_torch_formula_in_fp64(seed, shapes, lr, betas, eps, weight_decay):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    params = [torch.from_numpy(p.copy()) for p in init]
    exp_avgs = [torch.zeros(s) for s in shapes]
    exp_avg_sqs = [torch.zeros(s) for s in shapes]
    hyper = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
    deltas = []
    for t, gs in enumerate(grads, start=1):
        before = [p.clone() for p in params]
        g = [torch.from_numpy(x.copy()) for x in gs]
        adamw_step(params, g, exp_avgs, exp_avg_sqs, [t] * len(params), **hyper)
        assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(g, gs))  # gradients are read only
        deltas.append([(p.double() - b.double()).numpy() for p, b in zip(params, before)])
    for i, p0 in enumerate(init):
        ref = torch_adamw_fp64(p0, [gs[i] for gs in grads], **hyper)
        for t in range(3):
            # Each element's step is lr·(an O(1) Adam ratio + wd·P), so the error is measured in
            # units of lr: fp32 moments, sqrt and division (a few u = 6e-8 each, relative: ~1e-5·lr
            # measured) plus the rounding of P' itself, half an ulp of |P'| < 8 (N(0, 1) draws):
            # ≤ 2.4e-7 absolute, 2.4e-4·lr at lr = 1e-3. Measured worst over 2000 draws: 2.7e-4·lr
            # (lr = 1e-3), 8.3e-6·lr (lr = 0.05); tolerance ×~4 the worst. A wrong step is off by O(lr).
            err = np.max(np.abs(deltas[t][i] - ref[t]), initial=0.0)
            assert err <= 1e-3 * lr


def test_each_parameter_uses_its_own_step_count():
    """Counts differ when some parameters missed earlier gradients: a list step with counts
    [1, 3] is each parameter's step on its own (elementwise ops on the same numbers: bitwise)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    moments = [(torch.rand(p.shape, generator=g), torch.rand(p.shape, generator=g)) for p in params]
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    singles = [(p.clone(), m.clone(), v.clone()) for p, (m, v) in zip(params, moments)]
    adamw_step(params, grads, [m for m, _ in moments], [v for _, v in moments], [1, 3], **hyper)
    for i, (t, (p, m, v)) in enumerate(zip([1, 3], singles)):
        adamw_step([p], [grads[i]], [m], [v], [t], **hyper)
        assert torch.equal(p, params[i]) and torch.equal(m, moments[i][0]) and torch.equal(v, moments[i][1])


def test_first_step_is_lr_times_sign():
    # t = 1: m̂ = g and v̂ = g², so without decay the step is −lr·g/(|g| + eps).
    p = torch.zeros(4)
    g = torch.tensor([2.0, -0.5, 1e-3, -4.0])
    adamw_step([p], [g], [torch.zeros(4)], [torch.zeros(4)], [1], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0)
    # eps/|g| ≤ 1e-5 relative, plus fp32 rounding of the moments and bias corrections (~1e-7)
    torch.testing.assert_close(p, -0.1 * torch.sign(g), rtol=2e-5, atol=0)


def test_decay_is_decoupled_and_empty_lists_are_a_no_op():
    # zero gradient, zero moments: the update term is 0/(0 + eps) = 0, leaving p·(1 − lr·wd)
    p = torch.tensor([1.0, -2.0, 4.0])
    adamw_step([p], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [1], lr=0.5, beta1=0.9, beta2=0.99,
               eps=1e-8, weight_decay=0.25)
    assert torch.equal(p, torch.tensor([1.0, -2.0, 4.0]) * (1 - 0.5 * 0.25))  # dyadic: exact
    adamw_step([], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
