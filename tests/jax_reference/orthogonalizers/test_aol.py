"""jax_reference.orthogonalizers.aol (Turbo-Muon) against its fp64 oracle and optax.contrib.muon's preconditioning="aol"
(.specs/orthogonalizers.md §4, §8). JAX only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from optax.contrib import _muon as optax_muon

from jax_reference.orthogonalizers.aol import aol, aol_oracle, aol_precondition
from jax_reference.orthogonalizers.newton_schulz import NS5_COEFFS
from jax_reference.orthogonalizers.schedules import SCHEDULES, YOU_COEFFS
from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import (
    DIMS,
    FEW_DIMS,
    KINDS,
    SEEDS,
    bf16_rounded,
    examples,
    matrix,
    rel_err,
)
from tests.rounding_bounds import FP32_U, FP64_U, ns_condition, tolerance

TURBO = SCHEDULES["aol"].triples(4)  # You's schedule minus its first step
KAPPA = ns_condition(TURBO, 1.0)  # ≈ 121 = Π|a_k|: AOL's X₀ has ‖X₀‖₂ ≤ 1
TOL32 = tolerance(FP32_U, KAPPA)  # 1.4e-5; measured worst 4.3e-6 (rank-deficient), 6.9e-7 (Gaussian)


@examples(0.6)
@given(m=DIMS, n=DIMS, seed=SEEDS, kind=KINDS)
def test_precondition_bounds_the_spectral_norm(m, n, seed, kind):
    # ‖D X‖₂ ≤ 1 exactly (spec §4's proof); fp64 SVD error ~1e-15.
    G = matrix(kind, seed, m, n, np.float64) * 10.0 ** (seed % 7 - 3)  # any scale
    X0 = aol_precondition(G)
    assert np.linalg.norm(X0, 2) <= 1 + 1e-12
    # The rows of the wide orientation are rescaled (D on the left; columns G·D when tall).
    ratio = X0 / G if m <= n else (X0 / G).T
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-12)
    assert np.all(ratio > 0)


@examples()
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS, kind=KINDS)
def test_fp32_matches_oracle(m, n, seed, kind):
    G = matrix(kind, seed, m, n)
    out = aol(G, compute_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (m, n)
    assert rel_err(out, aol_oracle(G)) <= TOL32


def test_float64_matches_oracle():
    # 2·u·κ with u = 2^-53: 2.7e-14.
    with jax.enable_x64(True):
        for (m, n), kind in zip([(8, 48), (32, 32), (48, 16)], ["gaussian", "rank_deficient", "ill_conditioned"]):
            G = matrix(kind, m * n, m, n, np.float64)
            out = aol(G, compute_dtype=jnp.float64)
            assert out.dtype == jnp.float64
            assert rel_err(out, aol_oracle(G)) <= tolerance(FP64_U, KAPPA)


@examples(0.4)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_bf16_within_band(m, n, seed):
    # On U·diag(s)·Vᵀ, s ∈ [0.1, 1], against the oracle on the bf16-rounded input. Band = 2 × the
    # measured worst over 128 inputs, 0.0084.
    G = matrix("well_conditioned", seed, m, n)
    assert rel_err(aol(G), aol_oracle(bf16_rounded(G))) <= 0.017


def test_matches_optax_aol_preconditioning():
    """optax.contrib 0.2.8 folds the same AOL rescaling into its first step. Given exactly 4 table rows
    for ns_steps=4 (a shorter table would silently run fewer steps: ANCHORS.md) and our eps, both are
    within 2·u·κ of the oracle, hence within twice that of each other (measured 7.7e-7)."""
    G = {"wide": matrix("gaussian", 1, 8, 32), "tall": matrix("gaussian", 2, 32, 8)}
    ours = {k: np.asarray(aol(g, compute_dtype=jnp.float32), np.float64) for k, g in G.items()}
    table = jnp.asarray(TURBO, jnp.float32)
    theirs = optax_muon.orthogonalize_via_newton_schulz(jnp.asarray(G["wide"]), table, 4, "aol", 1e-7)
    assert rel_err(theirs, ours["wide"]) <= 2 * TOL32
    # The public optimizer, one step: beta = 0 makes its bias-corrected Nesterov input exactly G,
    # lr = 1 and no decay leave update = −scale·orth(G), scale = √max(1, n/m) for (in, out) = (m, n).
    tx = optax.contrib.muon(1.0, ns_coeffs=TURBO, ns_steps=4, beta=0.0, eps=1e-7, preconditioning="aol")
    params = jax.tree.map(jnp.zeros_like, G)
    update, _ = tx.update(jax.tree.map(jnp.asarray, G), tx.init(params), params)
    for k, g in G.items():
        m, n = g.shape
        assert rel_err(-np.asarray(update[k]) / np.sqrt(max(1, n / m)), ours[k]) <= 2 * TOL32, k
    # Other coefficients are told apart (the comparison has teeth): NS5, optax's default.
    assert rel_err(theirs, np.asarray(aol(G["wide"], 4, coeffs=NS5_COEFFS, compute_dtype=jnp.float32))) > 1e-2


def test_steps_take_the_last_triples():
    G = matrix("gaussian", 1, 8, 32)
    for steps in (1, 2, 5):
        np.testing.assert_array_equal(aol(G, steps=steps), aol(G, steps=steps, coeffs=YOU_COEFFS[5 - steps:]))
    assert rel_err(aol(G, steps=7, coeffs=NS5_COEFFS, compute_dtype=jnp.float32),
                   aol_oracle(G, steps=7, coeffs=NS5_COEFFS)) <= tolerance(FP32_U, ns_condition([NS5_COEFFS] * 7))
    for steps in (0, 6):
        with pytest.raises(ValueError, match=r"'aol' supports 1 <= steps <= 5"):
            aol(G, steps=steps)


def test_scale_invariance_and_zero():
    # AOL has no Frobenius normalisation: D(cG)·cG = D(G)·G exactly, unless the eps floor binds.
    G = matrix("gaussian", 2, 8, 32)
    base = np.asarray(aol(G, compute_dtype=jnp.float32), np.float64)
    for c in (1e-2, 1e3):
        assert rel_err(aol(G * np.float32(c), compute_dtype=jnp.float32), base) <= 2 * TOL32
    np.testing.assert_array_equal(aol(np.zeros((8, 16), np.float32)), 0.0)
    # A zero row (rank deficiency in the small side) stays zero.
    G[3] = 0.0
    np.testing.assert_array_equal(np.asarray(aol(G, compute_dtype=jnp.float32))[3], 0.0)


def test_tall_batch_jit_and_dtype():
    G = matrix("gaussian", 3, 2 * 8, 32).reshape(2, 8, 32)
    batched = np.asarray(aol(G, compute_dtype=jnp.float32))
    looped = np.stack([np.asarray(aol(G[i], compute_dtype=jnp.float32)) for i in range(2)])
    tall = np.asarray(aol(np.swapaxes(G, -1, -2), compute_dtype=jnp.float32))
    jitted = np.asarray(jax.jit(lambda x: aol(x, compute_dtype=jnp.float32))(G))
    for other in (looped, np.swapaxes(tall, -1, -2), jitted):  # other summation orders: 2× the bound
        assert rel_err(other, batched.astype(np.float64)) <= 2 * TOL32
    out = aol(jnp.asarray(G, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 32)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    x, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        aol(jnp.asarray(x))
    with pytest.raises(ValueError, match=message):
        aol_oracle(x)
