"""jax_reference.optim.muon's named orthogonalizers and its MuonEq / Muon+ options
(.specs/orthogonalizers.md §1, §6). JAX only; the rest of muon() is tested in test_muon.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from jax_reference.optim.muon import (
    ORTHOGONALIZER_SCHEDULES,
    ORTHOGONALIZERS,
    balanced,
    frobenius_renormalize,
    muon,
    resolve_orthogonalizer,
    row_equilibrate,
)
from jax_reference.orthogonalizers.schedules import SCHEDULES
from jax_reference.sharding.sharded import row_mesh, shard_rows, sharded_muon, unshard_rows
from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import FEW_DIMS, SEEDS, examples, matrix, rel_err
from tests.rounding_bounds import FP32_U, equilibrate_bound, gram_condition, ns_condition, tolerance

NAMES = sorted(ORTHOGONALIZERS)


def default_steps(name):
    return SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]].default_steps


def fp32_tolerance(name):
    """2·u·κ of the named orthogonalizer at its default steps (rounding_bounds.py)."""
    s = SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]]
    triples = s.triples(s.default_steps)
    kappa = ns_condition(triples, 1 / s.norm_scale)
    if name == "gram_newton_schulz":
        kappa += gram_condition(triples, (2,), 1 / s.norm_scale)
    return tolerance(FP32_U, kappa)


def orth(name, X, dtype=jnp.float32):
    return ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=1e-7, compute_dtype=dtype)


# ---- the registry --------------------------------------------------------------------


def test_registry_names_and_schedules():
    assert tuple(ORTHOGONALIZERS) == ("newton_schulz", "polar_express", "gram_newton_schulz", "aol", "cans",
                                      "cubic", "deepseek_v4")
    assert set(ORTHOGONALIZER_SCHEDULES) == set(ORTHOGONALIZERS)
    assert ORTHOGONALIZER_SCHEDULES["gram_newton_schulz"] == "polar_express"


@pytest.mark.parametrize("name", NAMES)
def test_named_orthogonalizers_dispatch(name):
    # μ = 0, lr = 1, wide matrix (scale 1): the update is exactly −orth(G).
    G = matrix("gaussian", 1, 8, 32)
    tx = muon(1.0, momentum=0.0, ns_steps=default_steps(name), orthogonalizer=name)
    updates, _ = tx.update({"w": G}, tx.init({"w": G}), {"w": G})
    expected = ORTHOGONALIZERS[name](G, steps=default_steps(name), eps=1e-7, compute_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(-updates["w"], expected)  # same code path: bitwise


@pytest.mark.parametrize("name, steps, message", [
    ("cubic", 4, r"orthogonalizer 'cubic': ns_steps: schedule 'cubic' supports steps = 5 only, got steps=4"),
    ("deepseek_v4", 5, r"'deepseek_v4'.*steps >= 10"),
    ("aol", 6, r"'aol'.*1 <= steps <= 5"),
    ("gram_newton_schulz", 0, r"'gram_newton_schulz'.*steps >= 1"),
])
def test_unsupported_ns_steps_raise_when_built(name, steps, message):
    with pytest.raises(ValueError, match=message):
        muon(0.02, orthogonalizer=name, ns_steps=steps)
    with pytest.raises(ValueError, match=message):
        resolve_orthogonalizer(name, steps, jnp.float32)


def test_unknown_orthogonalizer_lists_every_name():
    with pytest.raises(ValueError, match="'newton_schulz', 'polar_express', 'gram_newton_schulz', 'aol', 'cans', "
                                         "'cubic', 'deepseek_v4'"):
        muon(0.02, orthogonalizer="svd")


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_zero_and_bad_inputs(name):
    G = jnp.asarray(matrix("gaussian", 2, 2 * 8, 32).reshape(2, 8, 32), jnp.bfloat16)
    out = orth(name, G, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 32)
    np.testing.assert_array_equal(orth(name, np.zeros((8, 32), np.float32)), 0.0)  # zero maps to zero
    for x, message in BAD_INPUTS.values():
        with pytest.raises(ValueError, match=message):
            orth(name, jnp.asarray(x))


@pytest.mark.parametrize("name", NAMES)
def test_tall_batch_and_jit_agree(name):
    # The same math each way in other summation orders: each within 2·u·κ of the exact result, so
    # within twice that of each other. A missing transpose-back or a mixed-up batch is O(1).
    G = matrix("gaussian", 9, 2 * 8, 32).reshape(2, 8, 32)
    base = np.asarray(orth(name, G), np.float64)
    tol = 2 * fp32_tolerance(name)
    tall = np.asarray(orth(name, np.swapaxes(G, -1, -2)))
    assert rel_err(np.swapaxes(tall, -1, -2), base) <= tol
    looped = np.stack([np.asarray(orth(name, G[i])) for i in range(2)])
    assert rel_err(looped, base) <= tol
    jitted = jax.jit(functools.partial(ORTHOGONALIZERS[name], steps=default_steps(name), eps=1e-7,
                                       compute_dtype=jnp.float32))(G)
    assert rel_err(jitted, base) <= tol
    if name == "aol":  # a square matrix is "wide": AOL scales its rows, its transpose's columns (spec §4)
        S = G[0, :, :8]
        assert rel_err(np.asarray(orth(name, S.T)).T, np.asarray(orth(name, S), np.float64)) > 1e-3


# ---- MuonEq and Muon+ (spec §6) ------------------------------------------------------


def nanochat_row_equilibrate(X):
    """nanochat's MuonEq in numpy fp64: target = ‖X‖_F/√rows, row norms floored at 1e-6."""
    target = np.linalg.norm(X) / np.sqrt(X.shape[0])
    return X * (target / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6))


@examples(0.6)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_row_equilibrate(m, n, seed):
    X = matrix("gaussian", seed, m, n) * np.exp(np.random.default_rng(seed).uniform(-3, 3, (m, 1))).astype(np.float32)
    X[0] = 0.0  # a zero row stays zero
    out = np.asarray(row_equilibrate(jnp.asarray(X)), np.float64)
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


@examples(0.6)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_frobenius_renormalize(m, n, seed):
    O = matrix("gaussian", seed, m, n) * np.float32(10.0 ** (seed % 5 - 2))
    out = np.asarray(frobenius_renormalize(jnp.asarray(O)), np.float64)
    assert abs(np.linalg.norm(out) / np.sqrt(min(m, n)) - 1) <= 1e-6  # ‖O‖_F = √min(m, n), fp32 rounding
    np.testing.assert_allclose(out * (np.linalg.norm(O) / np.linalg.norm(out)), O, rtol=1e-5, atol=1e-30)
    np.testing.assert_array_equal(frobenius_renormalize(jnp.zeros((m, n))), 0.0)


def identity(X, steps, eps, compute_dtype):
    return X


def test_options_off_leave_muon_unchanged():
    f = resolve_orthogonalizer("newton_schulz", 5, jnp.bfloat16)
    assert balanced(f, False, False) is f
    G, P = matrix("gaussian", 3, 16, 32), matrix("gaussian", 4, 16, 32)
    a = muon(0.02, normuon_beta2=0.95)
    b = muon(0.02, normuon_beta2=0.95, row_equilibration=False, frobenius_renormalization=False)
    ua, sa = a.update({"w": G}, a.init({"w": P}), {"w": P})
    ub, sb = b.update({"w": G}, b.init({"w": P}), {"w": P})
    jax.tree.map(np.testing.assert_array_equal, (ua, sa), (ub, sb))


@pytest.mark.parametrize("shape", [(16, 32), (32, 8), (8, 4, 4)])
def test_muon_with_both_options_two_steps(shape):
    """Two steps with orth = identity against numpy fp64: U = lerp(G, M, μ) (M not equilibrated),
    O = renorm(equilibrate(U)), NorMuon after it (its v sees the renormalised O), shape scale, lr."""
    rng = np.random.default_rng(5)
    P = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    rows, cols = shape[0], int(np.prod(shape[1:]))
    mu, beta2, lr = 0.9, 0.95, 0.1
    tx = muon(lr, momentum=mu, orthogonalizer=identity, normuon_beta2=beta2, row_equilibration=True,
              frobenius_renormalization=True)
    state = tx.init({"w": P})
    M, v = np.zeros((rows, cols)), 0.0
    for G in grads:
        update, state = tx.update({"w": G}, state, {"w": P})
        g = G.astype(np.float64).reshape(rows, cols)
        M = M + (1 - mu) * (g - M)
        O = nanochat_row_equilibrate(g + mu * (M - g))
        O = O * np.sqrt(min(rows, cols)) / np.linalg.norm(O)
        axis = 1 if rows >= cols else 0
        v = v + (1 - beta2) * (np.mean(O * O, axis=axis, keepdims=True) - v)
        OD = O / np.sqrt(np.maximum(v, 1e-10))
        O = OD * np.linalg.norm(O) / np.linalg.norm(OD)
        expected = -lr * max(1, rows / cols) ** 0.5 * O
        # fp32 elementwise math on O(1) values, two steps: ~1e-6 relative.
        assert rel_err(np.asarray(update["w"]).reshape(rows, cols), expected) <= 1e-5
        np.testing.assert_allclose(np.asarray(state.momentum["w"]).reshape(rows, cols), M, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["polar_express", "aol"])
def test_muon_plus_output_norm(name):
    # Without NorMuon and with a wide matrix (scale 1, lr 1, μ = 0): ‖update‖_F = √min(m, n) exactly up
    # to fp32 rounding, whatever the orthogonalizer's own band (PE ends with σ ∈ [0.1, 1.14]).
    G = matrix("ill_conditioned", 6, 8, 32)
    tx = muon(1.0, momentum=0.0, orthogonalizer=name, ns_steps=default_steps(name), frobenius_renormalization=True)
    update, _ = tx.update({"w": G}, tx.init({"w": G}), {"w": G})
    assert abs(np.linalg.norm(np.asarray(update["w"], np.float64)) / np.sqrt(8) - 1) <= 1e-6
    plain = muon(1.0, momentum=0.0, orthogonalizer=name, ns_steps=default_steps(name))
    other, _ = plain.update({"w": G}, plain.init({"w": G}), {"w": G})
    assert abs(np.linalg.norm(np.asarray(other["w"], np.float64)) / np.sqrt(8) - 1) > 1e-3  # it did something


def test_muon_eq_conditions_the_orthogonalizer_input():
    """MuonEq before orth: on a matrix whose rows differ in scale by 10^6, NS5 alone leaves the small
    rows unconverged; after equilibration the input to orth has equal row norms."""
    G = matrix("gaussian", 7, 8, 32) * np.logspace(0, -6, 8, dtype=np.float32)[:, None]
    seen = []

    def spy(X, steps, eps, compute_dtype):
        seen.append(np.asarray(X))
        return X

    tx = muon(1.0, momentum=0.0, orthogonalizer=spy, row_equilibration=True)
    tx.update({"w": G}, tx.init({"w": G}), {"w": G})
    norms = np.linalg.norm(seen[0], axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)


def test_sharded_step_with_both_options_equals_one_device():
    """The options act inside orth, which runs on each matrix's owner on the whole matrix (spec §6):
    the row-sharded step on 2 devices equals the single-device one (fp32 NS, ~1 fp32 ulp apart)."""
    rng = np.random.default_rng(8)
    params = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in [("a", (9, 16)), ("b", (16, 8))]}
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    kw = dict(ns_dtype=jnp.float32, row_equilibration=True, frobenius_renormalization=True, nonfinite="skip")
    single = muon(0.02, **kw)
    u1, _ = single.update(grads, single.init(params), params)
    mesh = row_mesh(2)
    tx = sharded_muon(mesh, 0.02, **kw)
    stored = shard_rows(params, mesh)
    u2, _ = jax.jit(tx.update)(shard_rows(grads, mesh), tx.init(stored), stored)
    for k in params:
        np.testing.assert_allclose(np.asarray(unshard_rows(u2)[k]), np.asarray(u1[k]), rtol=0, atol=1e-6)
