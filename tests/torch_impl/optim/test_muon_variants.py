"""torch_impl.optim.muon.Muon with every named orthogonalizer and with the MuonEq / Muon+ options
(.specs/orthogonalizers.md §1, §6): dispatch, step counts checked when built, the options' effect
on a step. torch only; the registry and the options alone are tested in tests/torch_impl/
orthogonalizers/, the rest of the step in test_muon.py / test_base.py, the JAX side in
tests/jax_reference/optim/test_muon_variants.py, the two compared in
parity_tests/test_orthogonalizer_zoo_parity.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.orthogonalizer_cases import identity, matrix, muon_plus, nanochat_row_equilibrate, rel_err
from tests.torch_impl.orthogonalizers.test_registry import NAMES, PUBLIC, f64, fp32_tolerance
from torch_impl.optim import Muon
from torch_impl.optim.muon import MuonHyper, muon_step
from torch_impl.orthogonalizers.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    polynomial_oracle,
)
from torch_impl.orthogonalizers.registry import (
    NS_EPS,
    ORTHOGONALIZERS,
    check_orthogonalizer,
    default_steps,
    resolve_orthogonalizer,
)

# ---- the registry, through Muon ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_named_orthogonalizers_dispatch_through_muon(name):
    # μ = 0, lr = 1, wide matrix (scale 1), P = 0: the parameter after one step is exactly −orth(G).
    G = torch.from_numpy(matrix("gaussian", 1, 8, 32))
    p = torch.nn.Parameter(torch.zeros(8, 32))
    opt = Muon([p], lr=1.0, momentum=0.0, ns_steps=default_steps(name), orthogonalizer=name)
    p.grad = G.clone()
    opt.step()
    expected = PUBLIC[name](G, steps=default_steps(name), eps=NS_EPS, compute_dtype=torch.bfloat16)
    assert torch.equal(-p.detach(), expected.float())  # same code path: bitwise


UNSUPPORTED = [
    ("newton_schulz", 0, "newton_schulz", r"steps >= 1, got steps=0"),
    ("polar_express", -2, "polar_express", r"steps >= 1, got steps=-2"),
    ("gram_newton_schulz", 0, "polar_express", r"steps >= 1, got steps=0"),
    ("aol", 5 + 1, "aol", r"1 <= steps <= 5, got steps=6"),
    ("aol", 0, "aol", r"1 <= steps <= 5, got steps=0"),
    ("cans", 2.5, "cans", r"steps >= 1, got steps=2.5"),
    ("cubic", 4, "cubic", r"steps = 5 only, got steps=4"),
    ("deepseek_v4", 5, "deepseek_v4", r"steps >= 10, got steps=5"),
]


@pytest.mark.parametrize("name, steps, schedule, rule", UNSUPPORTED)
def test_unsupported_ns_steps_raise_when_built(name, steps, schedule, rule):
    message = rf"orthogonalizer '{name}': ns_steps: schedule '{schedule}' supports {rule}"
    with pytest.raises(ValueError, match=message):
        Muon([torch.nn.Parameter(torch.zeros(4, 8))], orthogonalizer=name, ns_steps=steps)
    with pytest.raises(ValueError, match=message):
        resolve_orthogonalizer(name, steps, torch.float32)
    with pytest.raises(ValueError, match=message):
        check_orthogonalizer(name, steps, torch.float32)


def test_every_name_has_an_unsupported_case_and_accepts_its_default():
    assert {case[0] for case in UNSUPPORTED} == set(ORTHOGONALIZERS)
    for name in ORTHOGONALIZERS:
        check_orthogonalizer(name, default_steps(name), torch.bfloat16)
        Muon([torch.nn.Parameter(torch.zeros(4, 8))], orthogonalizer=name, ns_steps=default_steps(name))


def test_gram_float16_range_is_checked_when_built():
    """gram_newton_schulz in bf16 runs in float16 and refuses a segment whose Q could overflow
    (spec §3): Muon's constructor raises it (a trial call), not the owners' first step."""
    with pytest.raises(ValueError, match=r"float16.*steps 3\.\.13"):
        Muon([torch.nn.Parameter(torch.zeros(4, 8))], orthogonalizer="gram_newton_schulz", ns_steps=15)
    with pytest.raises(ValueError, match=r"float16.*steps 3\.\.13"):
        check_orthogonalizer("gram_newton_schulz", 15, torch.float16)
    Muon([torch.nn.Parameter(torch.zeros(4, 8))], orthogonalizer="gram_newton_schulz", ns_steps=15,
         ns_dtype=torch.float32)


@pytest.mark.parametrize("group, message", [
    (dict(orthogonalizer="deepseek_v4"), "'deepseek_v4' supports steps >= 10, got steps=5"),
    (dict(orthogonalizer="nope"), "unknown orthogonalizer 'nope'"),
    (dict(orthogonalizer="cubic", ns_steps=3), "steps = 5 only"),
])
def test_a_groups_own_orthogonalizer_settings_are_checked_when_built(group, message):
    """A param group may override the defaults; its settings are checked at construction too
    (inside the collective construction check), not at the owners' first step."""
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 8))], **group}])


def test_unknown_orthogonalizer_lists_every_name():
    with pytest.raises(ValueError, match="newton_schulz, polar_express, gram_newton_schulz, aol, cans, cubic, "
                                         "deepseek_v4"):
        Muon([torch.nn.Parameter(torch.zeros(4, 8))], orthogonalizer="svd")
    with pytest.raises(ValueError, match="unknown orthogonalizer 'svd'"):
        resolve_orthogonalizer("svd", 5, torch.float32)


# ---- MuonEq and Muon+ (spec §6) ------------------------------------------------------


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def run_steps(opt, params, steps=3, seed=10):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


SHAPES = [(16, 32), (32, 8), (8, 4, 4), (16, 32)]


@pytest.mark.parametrize("name", ["newton_schulz", "polar_express", "aol"])
def test_options_off_leave_muon_unchanged(name):
    """Explicitly off = the default constructor, bitwise (params and state), and = muon_step with the
    plain resolved orthogonalizer (the code path before the options existed)."""
    kw = dict(lr=0.02, weight_decay=0.1, normuon_beta2=0.95, orthogonalizer=name, ns_steps=default_steps(name))
    a, b, c = make_params(SHAPES), make_params(SHAPES), make_params(SHAPES)
    default = Muon(a, **kw)
    off = Muon(b, **kw, row_equilibration=False, frobenius_renormalization=False)
    assert default.param_groups[0]["row_equilibration"] is False
    assert default.param_groups[0]["frobenius_renormalization"] is False
    run_steps(default, a), run_steps(off, b)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert all(torch.equal(default.state[p][k], off.state[q][k]) for k in default.state[p])
    # by hand: muon_step on each same-shape stack with resolve_orthogonalizer's callable
    hp = MuonHyper(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, cautious_weight_decay=False,
                   normuon_beta2=0.95, shape_scale="max_ratio",
                   orthogonalize=resolve_orthogonalizer(name, default_steps(name), torch.bfloat16))
    stacks = [[0, 3], [1], [2]]
    views = [(2, 16, 32), (1, 32, 8), (1, 8, 16)]
    M = [torch.zeros(v) for v in views]
    V = [torch.zeros(v[0], *((v[1], 1) if v[1] >= v[2] else (1, v[2]))) for v in views]
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in c]
        for idx, view, m, v in zip(stacks, views, M, V):
            P = torch.stack([c[i].detach().reshape(view[1:]) for i in idx])
            muon_step(P, torch.stack([grads[i].reshape(view[1:]) for i in idx]), m, v, hp)
            for j, i in enumerate(idx):
                c[i].data.copy_(P[j].reshape(c[i].shape))
    for p, q in zip(a, c):
        assert torch.equal(p, q)


@pytest.mark.parametrize("row_equilibration, frobenius_renormalization", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(16, 32), (32, 8), (8, 4, 4)])
def test_muon_with_options_two_steps_identity(shape, row_equilibration, frobenius_renormalization):
    """Two steps with orth = identity against numpy fp64 of spec (3'): U = lerp(G, M, μ) (M not
    equilibrated), O = renorm(equilibrate(U)), NorMuon after it (its v sees the renormalised O),
    shape scale, lr."""
    rng = np.random.default_rng(5)
    P0 = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    rows, cols = shape[0], int(np.prod(shape[1:]))
    mu, beta2, lr = 0.9, 0.95, 0.1
    p = torch.nn.Parameter(torch.from_numpy(P0.copy()))
    opt = Muon([p], lr=lr, momentum=mu, orthogonalizer=identity, normuon_beta2=beta2,
               row_equilibration=row_equilibration, frobenius_renormalization=frobenius_renormalization)
    P, M, v = P0.astype(np.float64).reshape(rows, cols), np.zeros((rows, cols)), 0.0
    for G in grads:
        p.grad = torch.from_numpy(G.copy())
        opt.step()
        g = G.astype(np.float64).reshape(rows, cols)
        M = M + (1 - mu) * (g - M)
        O = g + mu * (M - g)
        if row_equilibration:
            O = nanochat_row_equilibrate(O)
        if frobenius_renormalization:
            O = muon_plus(O)
        axis = 1 if rows >= cols else 0
        v = v + (1 - beta2) * (np.mean(O * O, axis=axis, keepdims=True) - v)
        OD = O / np.sqrt(np.maximum(v, 1e-10))
        O = OD * np.linalg.norm(O) / np.linalg.norm(OD)
        P = P - lr * max(1, rows / cols) ** 0.5 * O
        # fp32 elementwise math on O(1) values, two steps: test_muon.py's tolerance for the step
        # without the options (3e-6, its measured worst 3.9e-7); the options add a few fp32 ops per
        # element: measured worst 8.6e-8 over 20 seeds × 5 shapes (these and 1×8, 8×1) × the 3
        # settings. A wrong formula or order is off by O(1e-2).
        assert rel_err(f64(p).reshape(rows, cols), P) <= 3e-6
        assert rel_err(f64(opt.state[p]["momentum_buffer"]).reshape(rows, cols), M) <= 3e-6


@pytest.mark.parametrize("shape", [(8, 32), (32, 8)])
def test_muon_with_both_options_and_a_real_orthogonalizer(shape):
    """(3') with orth = Polar Express in fp32 against fp64: equilibrate, polynomial_oracle, renormalise.
    Bound: PE's 2·u·κ (rounding_bounds, 1.2e-4 relative) for the orthogonalizer, doubled for the
    fp32 equilibration's few-ulp input error carried by the same κ, and doubled again by Muon+'s
    division by ‖O‖_F (whose relative error is at most O's): 4·2·u·κ = 4.7e-4. Measured worst 2.4e-5
    over 10 seeds × (8×32, 32×8, 16×16)."""
    rng = np.random.default_rng(6)
    rows, cols = shape
    grads = [matrix("ill_conditioned", 20 + k, rows, cols) * np.exp(rng.uniform(-2, 2, (rows, 1))).astype(np.float32)
             for k in range(2)]
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([p], lr=1.0, momentum=0.5, orthogonalizer="polar_express", ns_dtype=torch.float32,
               row_equilibration=True, frobenius_renormalization=True)
    P, M = np.zeros(shape), np.zeros(shape)
    for G in grads:
        p.grad = torch.from_numpy(G.copy())
        opt.step()
        g = G.astype(np.float64)
        M = M + 0.5 * (g - M)
        U = nanochat_row_equilibrate(g + 0.5 * (M - g))
        O = f64(polynomial_oracle(torch.from_numpy(U), POLAR_EXPRESS_COEFFS, 5, NS_EPS, 1.01))
        P = P - max(1, rows / cols) ** 0.5 * muon_plus(O)
        assert rel_err(f64(p), P) <= 4 * fp32_tolerance("polar_express")


@pytest.mark.parametrize("name", ["polar_express", "aol"])
def test_muon_plus_output_norm(name):
    # Without NorMuon and with a wide matrix (scale 1, lr 1, μ = 0, P = 0): ‖P‖_F = √min(m, n) up to
    # fp32 rounding (1e-6), whatever the orthogonalizer's own band (PE ends with σ ∈ [0.1, 1.14]).
    G = torch.from_numpy(matrix("ill_conditioned", 6, 8, 32))

    def one_step(**kw):
        p = torch.nn.Parameter(torch.zeros(8, 32))
        opt = Muon([p], lr=1.0, momentum=0.0, orthogonalizer=name, ns_steps=default_steps(name), **kw)
        p.grad = G.clone()
        opt.step()
        return np.linalg.norm(f64(p)) / math.sqrt(8)

    assert abs(one_step(frobenius_renormalization=True) - 1) <= 1e-6
    assert abs(one_step() - 1) > 1e-3  # it did something


def test_muon_eq_conditions_the_orthogonalizer_input():
    """MuonEq before orth: on a matrix whose rows differ in scale by 10^6, the input to orth has equal
    row norms (fp32: 1e-5 relative); without the option it is the Nesterov update itself."""
    G = torch.from_numpy(matrix("gaussian", 7, 8, 32)) * torch.logspace(0, -6, 8)[:, None]
    seen = []

    def spy(X, steps, eps, compute_dtype):
        seen.append(X.clone())
        return X

    for on in (True, False):
        p = torch.nn.Parameter(torch.zeros(8, 32))
        opt = Muon([p], lr=1.0, momentum=0.0, orthogonalizer=spy, row_equilibration=on)
        p.grad = G.clone()
        opt.step()
        norms = seen[-1][0].norm(dim=1)
        if on:
            torch.testing.assert_close(norms, torch.full_like(norms, float(norms[0])), rtol=1e-5, atol=0)
        else:
            assert torch.equal(seen[-1][0], G)
    assert len(seen) == 2


def test_options_are_group_keys():
    """Per-group settings (torch group keys of the same names): a group with MuonEq + Muon+ next to a
    plain one equals two optimizers with those settings; a state_dict saved before the options existed
    (groups without the keys) loads with the settings the optimizer was built with."""
    a, b, c = make_params([(16, 32), (16, 32)]), make_params([(16, 32), (16, 32)]), make_params([(16, 32)] * 2)
    kw = dict(lr=0.05, normuon_beta2=0.95, ns_dtype=torch.float32)
    mixed = Muon([{"params": [a[0]], "row_equilibration": True, "frobenius_renormalization": True},
                  {"params": [a[1]]}], **kw)
    on = Muon([b[0]], **kw, row_equilibration=True, frobenius_renormalization=True)
    off = Muon([b[1]], **kw)
    run_steps(mixed, a, steps=2)
    g = torch.Generator().manual_seed(10)
    for _ in range(2):
        for p in b:
            p.grad = torch.randn(p.shape, generator=g)
        on.step(), off.step()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])  # the options did something (same inputs otherwise)
    plain = Muon(c, **kw)
    saved = plain.state_dict()
    for group in saved["param_groups"]:
        del group["row_equilibration"], group["frobenius_renormalization"]
    restored = Muon([torch.nn.Parameter(p.detach().clone()) for p in c], **kw)
    restored.load_state_dict(saved)
    assert "row_equilibration" not in restored.param_groups[0]
    params = restored.param_groups[0]["params"]
    run_steps(plain, c, steps=1), run_steps(restored, params, steps=1)
    assert all(torch.equal(p, q) for p, q in zip(c, params))
    # Built with both options on, the old state dict does not switch them off.
    d = make_params([(16, 32)] * 2)
    built_on = Muon([torch.nn.Parameter(p.detach().clone()) for p in d], **kw, row_equilibration=True,
                    frobenius_renormalization=True)
    built_on.load_state_dict(saved)
    reference = Muon(d, **kw, row_equilibration=True, frobenius_renormalization=True)
    run_steps(reference, d, steps=1), run_steps(built_on, built_on.param_groups[0]["params"], steps=1)
    assert all(torch.equal(p, q) for p, q in zip(d, built_on.param_groups[0]["params"]))
