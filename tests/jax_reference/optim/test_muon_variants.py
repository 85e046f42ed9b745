"""jax_reference.optim.muon with the MuonEq / Muon+ options (.specs/orthogonalizers.md §6), on one
device and sharded. JAX only; the options themselves are tested in orthogonalizers/test_balance.py,
the named orthogonalizers in orthogonalizers/test_registry.py, the rest of muon() in test_muon.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_reference.optim.muon import muon, sharded_muon
from jax_reference.orthogonalizers.balance import balanced
from jax_reference.orthogonalizers.registry import resolve_orthogonalizer
from jax_reference.sharding.sharded import row_mesh, shard_rows, unshard_rows
from tests.jax_reference.orthogonalizers.test_registry import default_steps
from tests.orthogonalizer_cases import identity, matrix, nanochat_row_equilibrate, rel_err


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
