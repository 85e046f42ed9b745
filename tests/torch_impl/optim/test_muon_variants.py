"""torch_impl.optim.muon's named orthogonalizers and the MuonEq / Muon+ options, alone and inside
torch_impl.optim.base.Muon (.specs/orthogonalizers.md §1, §6). torch only; the rest of the step is tested
in test_muon.py / test_optim.py, the JAX side in tests/jax_reference/optim/test_muon_variants.py, the two
registries and trajectories compared in parity_tests/test_orthogonalizer_zoo_parity.py."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import FEW_DIMS, SEEDS, examples, matrix, rel_err
from tests.rounding_bounds import FP32_U, equilibrate_bound, gram_condition, ns_condition, tolerance
from torch_impl.optim.base import Muon
from torch_impl.optim.muon import (
    NS_EPS,
    ORTHOGONALIZER_SCHEDULES,
    ORTHOGONALIZERS,
    MuonHyper,
    balanced,
    check_orthogonalizer,
    default_steps,
    frobenius_renormalize,
    muon_step,
    resolve_orthogonalizer,
    row_equilibrate,
)
from torch_impl.orthogonalizers.aol import aol
from torch_impl.orthogonalizers.gram_newton_schulz import gram_newton_schulz
from torch_impl.orthogonalizers.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    newton_schulz,
    polar_express,
    polynomial_oracle,
)
from torch_impl.orthogonalizers.schedules import SCHEDULES, cans, cubic, deepseek_v4

NAMES = sorted(ORTHOGONALIZERS)
PUBLIC = {"newton_schulz": newton_schulz, "polar_express": polar_express, "gram_newton_schulz": gram_newton_schulz,
          "aol": aol, "cans": cans, "cubic": cubic, "deepseek_v4": deepseek_v4}
SPEC = Path(__file__).resolve().parents[3] / ".specs" / "orthogonalizers.md"


def spec_registry() -> dict[str, str]:
    """name -> the 'steps supported (default)' cell of the registry table in spec §1."""
    text = SPEC.read_text()
    section = text[text.index("## §1"):text.index("## §2")]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    return {row[1].strip().strip("`"): row[-2].strip() for row in rows}


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def fp32_tolerance(name):
    """2·u·κ of the named orthogonalizer at its default steps (rounding_bounds.py)."""
    s = SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]]
    triples = s.triples(s.default_steps)
    kappa = ns_condition(triples, 1 / s.norm_scale)
    if name == "gram_newton_schulz":
        kappa += gram_condition(triples, (2,), 1 / s.norm_scale)
    return tolerance(FP32_U, kappa)


def orth(name, X, dtype=torch.float32):
    return ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=NS_EPS, compute_dtype=dtype)


def identity(X, steps, eps, compute_dtype):
    return X


# ---- the registry --------------------------------------------------------------------


def test_registry_names_and_schedules():
    # The JAX registry's names, in its order (equality of the two registries is checked in
    # parity_tests, which may import both frameworks); here against spec §1's table.
    names = ("newton_schulz", "polar_express", "gram_newton_schulz", "aol", "cans", "cubic", "deepseek_v4")
    assert tuple(ORTHOGONALIZERS) == names == tuple(spec_registry())
    assert tuple(ORTHOGONALIZER_SCHEDULES) == names
    assert ORTHOGONALIZER_SCHEDULES["gram_newton_schulz"] == "polar_express"
    assert all(ORTHOGONALIZER_SCHEDULES[n] == n for n in names if n != "gram_newton_schulz")
    for name, fn in ORTHOGONALIZERS.items():  # the public function, its own finite check off (Muon checks)
        assert isinstance(fn, functools.partial) and fn.func is PUBLIC[name], name
        assert fn.args == () and fn.keywords == {"check_finite": False}, name


def test_default_steps_follow_the_spec_table():
    expected = {"newton_schulz": 5, "polar_express": 5, "gram_newton_schulz": 5, "aol": 4, "cans": 5, "cubic": 5,
                "deepseek_v4": 10}
    assert {name: default_steps(name) for name in ORTHOGONALIZERS} == expected
    words = {"≥ 1": "steps >= 1", "≥ 10": "steps >= 10", "1..5": "1 <= steps <= 5", "exactly 5": "steps = 5 only"}
    for name, cell in spec_registry().items():
        assert int(re.findall(r"\((\d+)\)", cell)[0]) == default_steps(name), name
        rule = next(words[k] for k in sorted(words, key=len, reverse=True) if cell.startswith(k))
        assert SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]].supported() == rule, name
    assert default_steps(identity) == 5  # a callable: Muon's default


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


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_zero_and_bad_inputs(name):
    G = torch.from_numpy(matrix("gaussian", 2, 2 * 8, 32).reshape(2, 8, 32)).bfloat16()
    out = orth(name, G, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 32)
    assert torch.equal(orth(name, torch.zeros(8, 32)), torch.zeros(8, 32))  # zero maps to zero
    for case, (x, message) in BAD_INPUTS.items():
        with pytest.raises(ValueError, match=message):  # the public function checks everything
            PUBLIC[name](torch.from_numpy(x), steps=default_steps(name))
        if case in ("nan", "inf"):  # the registered one leaves non-finite input to Muon's per-step check
            assert not torch.isfinite(orth(name, torch.from_numpy(x))).all()
        else:
            with pytest.raises(ValueError, match=message):
                orth(name, torch.from_numpy(x))


@pytest.mark.parametrize("name", NAMES)
def test_tall_and_batch_agree(name):
    # The same math each way in other summation orders: each within 2·u·κ of the exact result, so
    # within twice that of each other. A missing transpose-back or a mixed-up batch is O(1).
    G = torch.from_numpy(matrix("gaussian", 9, 2 * 8, 32).reshape(2, 8, 32))
    base = f64(orth(name, G))
    tol = 2 * fp32_tolerance(name)
    tall = f64(orth(name, G.mT.contiguous()))
    assert rel_err(np.swapaxes(tall, -1, -2), base) <= tol
    looped = np.stack([f64(orth(name, G[i])) for i in range(2)])
    assert rel_err(looped, base) <= tol
    if name == "aol":  # a square matrix is "wide": AOL scales its rows, its transpose's columns (spec §4)
        S = G[0, :, :8] * torch.logspace(0, -1, 8)[:, None]
        assert rel_err(f64(orth(name, S.mT.contiguous())).T, f64(orth(name, S))) > 1e-3


# ---- MuonEq and Muon+ (spec §6) ------------------------------------------------------


def nanochat_row_equilibrate(X):
    """nanochat's MuonEq in numpy fp64: target = ‖X‖_F/√rows, row norms floored at 1e-6."""
    target = np.linalg.norm(X) / np.sqrt(X.shape[0])
    return X * (target / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6))


def muon_plus(O):
    """Muon+ in numpy fp64: O·√min(rows, cols)/max(‖O‖_F, 1e-6)."""
    return O * np.sqrt(min(O.shape)) / max(np.linalg.norm(O), 1e-6)


@examples(0.6)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_row_equilibrate(m, n, seed):
    X = matrix("gaussian", seed, m, n) * np.exp(np.random.default_rng(seed).uniform(-3, 3, (m, 1))).astype(np.float32)
    X[0] = 0.0  # a zero row stays zero
    out = row_equilibrate(torch.from_numpy(X))
    assert out.dtype == torch.float32 and out.shape == (m, n)
    out = f64(out)
    # fp32 sums of squares, square roots, a division and a product: within the worst-case summation bound
    # (tests/rounding_bounds.py; 8.0e-6 at 32×8, 3.2e-5 at 32×32; measured 1.35e-6 at 32×32, seed 523,
    # where the former 1e-6 failed). A wrong target (√cols) or a missing row norm is O(1).
    assert rel_err(out, nanochat_row_equilibrate(X.astype(np.float64))) <= equilibrate_bound(m, n)
    norms = np.linalg.norm(out[1:], axis=1)
    target = np.linalg.norm(X.astype(np.float64)) / np.sqrt(m)
    np.testing.assert_allclose(norms, target, rtol=1e-5)  # every non-zero row at the quadratic mean
    np.testing.assert_array_equal(out[0], 0.0)
    # Each row keeps its direction: a positive multiple of the input row.
    np.testing.assert_allclose(out[1:] / np.linalg.norm(out[1:], axis=1, keepdims=True),
                               X[1:] / np.linalg.norm(X[1:], axis=1, keepdims=True), atol=1e-6)


def test_row_equilibrate_keeps_the_norm_per_matrix_and_floors_tiny_rows():
    # No zero row: ‖X‖_F is kept exactly (up to fp32 rounding), each matrix of a batch on its own.
    X = torch.from_numpy(matrix("gaussian", 3, 3 * 8, 16).reshape(3, 8, 16)) * torch.tensor([1e-3, 1.0, 1e3])[:, None,
                                                                                                             None]
    out = row_equilibrate(X)
    torch.testing.assert_close(out.square().sum((-2, -1)).sqrt(), X.square().sum((-2, -1)).sqrt(), rtol=1e-6, atol=0)
    for i in range(3):
        assert torch.equal(row_equilibrate(X[i]), out[i])  # per-matrix reductions on the same numbers: bitwise
    # A row below the 1e-6 floor is scaled by t/1e-6, not to norm t (nanochat's clamp_min).
    Y = torch.ones(2, 4)
    Y[1] = 1e-9
    t = math.sqrt((4 + 4e-18) / 2)
    torch.testing.assert_close(row_equilibrate(Y)[1], torch.full((4,), 1e-9 * t / 1e-6), rtol=1e-6, atol=0)


@examples(0.6)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_frobenius_renormalize(m, n, seed):
    O = matrix("gaussian", seed, m, n) * np.float32(10.0 ** (seed % 5 - 2))
    out = f64(frobenius_renormalize(torch.from_numpy(O)))
    assert abs(np.linalg.norm(out) / np.sqrt(min(m, n)) - 1) <= 1e-6  # ‖O‖_F = √min(m, n), fp32 rounding
    np.testing.assert_allclose(out * (np.linalg.norm(O) / np.linalg.norm(out)), O, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(out, muon_plus(O.astype(np.float64)), rtol=1e-6, atol=0)  # a few fp32 ulps
    assert torch.equal(frobenius_renormalize(torch.zeros(m, n)), torch.zeros(m, n))
    # batch: per matrix
    two = frobenius_renormalize(torch.from_numpy(np.stack([O, 2 * O])))
    torch.testing.assert_close(two[0], two[1], rtol=1e-6, atol=0)


def test_balanced_composes_in_the_spec_order():
    calls = []

    def spy(X):
        calls.append(X.clone())
        return 3 * X.double()  # a different dtype and scale: the result is fp32, renormalised

    X = torch.from_numpy(matrix("gaussian", 1, 8, 16)) * torch.logspace(0, -3, 8)[:, None]
    assert balanced(spy, False, False) is spy  # off: the orth callable itself (Muon unchanged bit for bit)
    out = balanced(spy, True, False)(X)
    assert torch.equal(calls[-1], row_equilibrate(X)) and out.dtype == torch.float32
    torch.testing.assert_close(out, 3 * row_equilibrate(X), rtol=1e-6, atol=0)
    out = balanced(spy, False, True)(X)
    assert torch.equal(calls[-1], X) and torch.equal(out, frobenius_renormalize((3 * X.double()).float()))
    out = balanced(spy, True, True)(X)
    assert torch.equal(calls[-1], row_equilibrate(X))
    assert torch.equal(out, frobenius_renormalize((3 * row_equilibrate(X).double()).float()))


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
