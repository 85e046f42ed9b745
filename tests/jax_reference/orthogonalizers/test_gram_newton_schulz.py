"""jax_reference.orthogonalizers.gram_newton_schulz against newton_schulz and polynomial_oracle
(.specs/orthogonalizers.md §3, §8). JAX only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from jax_reference.orthogonalizers.gram_newton_schulz import RESTART_AFTER, check_restarts, gram_newton_schulz
from jax_reference.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    coefficient_schedule,
    newton_schulz,
    polar_express,
    polynomial_oracle,
)
from jax_reference.orthogonalizers.schedules import CANS_COEFFS
from tests.orthogonalizer_cases import FEW_DIMS, KINDS, SEEDS, bf16_rounded, examples, matrix, rel_err
from tests.rounding_bounds import FP32_U, FP64_U, gram_condition, ns_condition, tolerance

PE_SCALE = 1 / POLAR_EXPRESS_NORM_SCALE
KAPPA_GRAM = gram_condition(POLAR_EXPRESS_COEFFS, RESTART_AFTER, PE_SCALE)  # ≈ 6.8e3
KAPPA_NS = ns_condition(POLAR_EXPRESS_COEFFS, PE_SCALE)  # ≈ 989


def pe_oracle(G):
    return polynomial_oracle(G, POLAR_EXPRESS_COEFFS, 5, norm_scale=POLAR_EXPRESS_NORM_SCALE)


@examples()
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS, kind=KINDS)
def test_fp32_matches_oracle_and_newton_schulz(m, n, seed, kind):
    G = matrix(kind, seed, m, n)
    out = gram_newton_schulz(G, compute_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (m, n)
    # 2·u·κ_gram = 8.1e-4 (R's roundings, Daleckii–Krein, rounding_bounds.py); measured worst 4.2e-4
    # over 16 shape pairs × 12 seeds of rank-deficient inputs (NS on the same: 3.5e-5).
    assert rel_err(out, pe_oracle(G)) <= tolerance(FP32_U, KAPPA_GRAM)
    # Each of Gram NS and NS is within its bound of the same oracle, so they differ by at most the sum.
    ns = newton_schulz(G, 5, POLAR_EXPRESS_COEFFS, compute_dtype=jnp.float32, norm_scale=POLAR_EXPRESS_NORM_SCALE)
    assert rel_err(out, np.asarray(ns, np.float64)) <= tolerance(FP32_U, KAPPA_GRAM + KAPPA_NS)


def test_float64_equals_newton_schulz_for_any_restarts():
    # In exact arithmetic Gram NS is NS whatever the restarts (spec §3's claim); in fp64 the gap is
    # 2·u·(κ_gram + κ_NS) with u = 2^-53 (≤ 5.3e-11 for no restart, 1.7e-12 for (2,)).
    with jax.enable_x64(True):
        for (m, n), kind in zip([(8, 32), (32, 8)], ["gaussian", "rank_deficient"]):
            G = matrix(kind, m + n, m, n, np.float64)
            ns = newton_schulz(G, 5, POLAR_EXPRESS_COEFFS, compute_dtype=jnp.float64, norm_scale=1.01)
            for restart_after in [(), (1,), (2,), (1, 2, 3, 4), (3, 9)]:
                kappa = gram_condition(POLAR_EXPRESS_COEFFS, restart_after, PE_SCALE) + KAPPA_NS
                out = gram_newton_schulz(G, compute_dtype=jnp.float64, restart_after=restart_after)
                assert out.dtype == jnp.float64
                assert rel_err(out, np.asarray(ns)) <= tolerance(FP64_U, kappa), restart_after
                assert rel_err(out, pe_oracle(G)) <= tolerance(FP64_U, kappa), restart_after


def test_float64_any_schedule_and_step_count():
    # The function takes any schedule: NS5 (one triple) for 7 steps, CANS with its last repeating.
    with jax.enable_x64(True):
        G = matrix("gaussian", 1, 8, 32, np.float64)
        for coeffs, steps in [(NS5_COEFFS, 7), (CANS_COEFFS, 6), (POLAR_EXPRESS_COEFFS, 2)]:
            out = gram_newton_schulz(G, steps, coeffs, compute_dtype=jnp.float64, norm_scale=1.0)
            schedule = coefficient_schedule(coeffs, steps)
            kappa = gram_condition(schedule, RESTART_AFTER) + ns_condition(schedule)
            assert rel_err(out, polynomial_oracle(G, coeffs, steps)) <= tolerance(FP64_U, kappa)


@examples(0.4)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_bf16_within_band(m, n, seed):
    # On U·diag(s)·Vᵀ, s ∈ [0.1, 1], against the oracle on the bf16-rounded input; a bf16 request
    # computes in float16 (spec §3). Band = 2 × the measured worst over 200 seeds × 6 shapes (8×64,
    # 8×24, 64×8, 8×128, 32×8, 48×16), 0.031 in JAX, 0.032 in torch (NS-PE in bf16: 0.035-0.054).
    G = matrix("well_conditioned", seed, m, n)
    assert rel_err(gram_newton_schulz(G), pe_oracle(bf16_rounded(G))) <= 0.064


def test_restarts_are_what_keeps_bf16_finite():
    """Rounding makes R's null eigenvalues slightly negative and the R update grows them by ~a² per
    step: without a restart a rank-deficient input computed in 16 bits (float16, spec §3) blows up
    (measured: nan), with the default restart after step 2 it stays O(1) like NS's own bf16
    null-space noise (measured 0.19; 1.1 when bf16 was used as such)."""
    G = matrix("rank_deficient", 7, 8, 32)
    ref = pe_oracle(bf16_rounded(G))
    assert rel_err(gram_newton_schulz(G), ref) <= 2.0
    assert not rel_err(gram_newton_schulz(G, restart_after=()), ref) <= 1e3  # inf/nan count as blown up


def test_square_falls_back_to_newton_schulz():
    G = matrix("gaussian", 2, 32, 32)
    np.testing.assert_array_equal(gram_newton_schulz(G), polar_express(G))  # same code path: bitwise


def test_tall_is_transpose_of_wide_and_batch_equals_loop():
    G = matrix("gaussian", 3, 2 * 3 * 8, 32).reshape(2, 3, 8, 32)
    batched = np.asarray(gram_newton_schulz(G, compute_dtype=jnp.float32))
    looped = np.stack([[np.asarray(gram_newton_schulz(G[i, j], compute_dtype=jnp.float32)) for j in range(3)]
                       for i in range(2)])
    tall = np.asarray(gram_newton_schulz(np.swapaxes(G, -1, -2), compute_dtype=jnp.float32))
    # Same math each way, other summation orders: each within 2·u·κ_gram of the oracle, so 2× apart.
    tol = 2 * tolerance(FP32_U, KAPPA_GRAM)
    assert rel_err(batched, looped.astype(np.float64)) <= tol
    assert rel_err(np.swapaxes(tall, -1, -2), batched.astype(np.float64)) <= tol


def test_zero_matrix_and_dtypes():
    np.testing.assert_array_equal(gram_newton_schulz(np.zeros((8, 32), np.float32)), 0.0)
    out = gram_newton_schulz(jnp.asarray(matrix("gaussian", 4, 8, 32), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (8, 32)


def test_jit_matches_eager():
    G = matrix("gaussian", 5, 8, 32)
    jitted = jax.jit(lambda x: gram_newton_schulz(x, compute_dtype=jnp.float32))(G)
    eager = gram_newton_schulz(G, compute_dtype=jnp.float32)
    assert rel_err(jitted, np.asarray(eager, np.float64)) <= 2 * tolerance(FP32_U, KAPPA_GRAM)


@pytest.mark.parametrize("bad", [(0,), 2, ("2",), (1.5,), (True,), None])
def test_bad_restart_after_raises(bad):
    with pytest.raises(ValueError, match=r"restart_after must be a sequence of integers >= 1"):
        gram_newton_schulz(np.ones((4, 8), np.float32), restart_after=bad)


def test_restart_positions():
    assert check_restarts((2,)) == {2} and check_restarts([]) == frozenset() and RESTART_AFTER == (2,)


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps"), ({"coeffs": (1.0, 2.0)}, "triple"),
                                             ({"compute_dtype": jnp.int32}, "floating")])
def test_bad_schedule_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gram_newton_schulz(np.ones((4, 8), np.float32), **kwargs)


def test_bf16_runs_in_float16_and_float16_range_is_checked():
    """spec §3: a bf16 request computes the Gram iteration in float16 (bitwise what float16 gives),
    square inputs stay bf16 newton_schulz; a float16 segment whose Q could pass 2^14 is refused."""
    G = jnp.asarray(matrix("well_conditioned", 8, 8, 32), jnp.bfloat16)
    np.testing.assert_array_equal(gram_newton_schulz(G), gram_newton_schulz(G, compute_dtype=jnp.float16))
    square = jnp.asarray(matrix("gaussian", 9, 16, 16), jnp.bfloat16)
    np.testing.assert_array_equal(gram_newton_schulz(square), polar_express(square))
    with pytest.raises(ValueError, match=r"float16 would overflow: steps 3\.\.13 run without a restart"):
        gram_newton_schulz(G, steps=15)
    with pytest.raises(ValueError, match=r"steps 1\.\.9"):
        gram_newton_schulz(G, steps=9, restart_after=(), compute_dtype=jnp.float16)
    assert gram_newton_schulz(G, steps=15, compute_dtype=jnp.float32).dtype == jnp.bfloat16  # fp32: no limit
    assert bool(jnp.all(jnp.isfinite(gram_newton_schulz(G, steps=12))))  # 12 steps: Q ≤ 1.2e4 < 2^14
