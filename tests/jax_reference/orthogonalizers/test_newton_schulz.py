"""jax_reference.orthogonalizers.newton_schulz against its fp64 oracles, and its bad-input errors (JAX only)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_reference.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    exact_polar,
    newton_schulz,
    polar_express,
    polynomial_oracle,
)
from tests.orthogonalizer_bad_inputs import BAD_INPUTS

DIMS = st.sampled_from([8, 16, 32, 48])
SEEDS = st.integers(0, 2**32 - 1)
SCHEDULES = {"ns5": (NS5_COEFFS, 1.0), "polar_express": (POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_NORM_SCALE)}


def examples(fraction=1.0):
    """The active Hypothesis profile's example count (conftest.py), scaled down for costly tests."""
    return settings(max_examples=max(3, round(settings().max_examples * fraction)), deadline=None)


# Relative Frobenius error vs polynomial_oracle, measured over all 16 shape
# pairs from {8,16,32,48}^2 x 10 Gaussian seeds (worst case, 5 steps):
#   fp32: ns5 1.2e-6, polar_express 9.1e-6 (its first step has coefficients up
#         to 22, which amplify f32 rounding); tolerance = worst x ~5.
#   bf16: ns5 2.3e-2, polar_express 6.5e-2 (8-bit mantissa, errors of 2^-9 per
#         fused op amplified by the same polynomials); tolerance = worst x ~2.5,
#         loose on purpose: it catches wrong math, the exact bf16 rounding
#         is pinned down by test_bf16_coefficients_are_float32.
TOL_FP32 = {"ns5": 1e-5, "polar_express": 5e-5}
TOL_BF16 = {"ns5": 6e-2, "polar_express": 1.5e-1}


def gaussian(seed, *shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def rel_err(x, ref):
    x = np.asarray(x).astype(np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@examples()
@given(m=DIMS, n=DIMS, seed=SEEDS, schedule=st.sampled_from(sorted(SCHEDULES)))
def test_fp32_matches_polynomial_oracle(m, n, seed, schedule):
    coeffs, norm_scale = SCHEDULES[schedule]
    G = gaussian(seed, m, n)
    out = newton_schulz(G, 5, coeffs, compute_dtype=jnp.float32, norm_scale=norm_scale)
    assert out.dtype == jnp.float32 and out.shape == (m, n)
    assert rel_err(out, polynomial_oracle(G, coeffs, 5, norm_scale=norm_scale)) <= TOL_FP32[schedule]


@examples(0.4)
@given(m=DIMS, n=DIMS, seed=SEEDS, schedule=st.sampled_from(sorted(SCHEDULES)))
def test_bf16_matches_polynomial_oracle(m, n, seed, schedule):
    coeffs, norm_scale = SCHEDULES[schedule]
    G = gaussian(seed, m, n)
    out = newton_schulz(G, 5, coeffs, compute_dtype=jnp.bfloat16, norm_scale=norm_scale)
    assert rel_err(out, polynomial_oracle(G, coeffs, 5, norm_scale=norm_scale)) <= TOL_BF16[schedule]


def test_polar_express_is_newton_schulz_with_its_schedule():
    G = gaussian(0, 16, 32)
    expected = newton_schulz(G, 5, POLAR_EXPRESS_COEFFS, norm_scale=POLAR_EXPRESS_NORM_SCALE)
    np.testing.assert_array_equal(polar_express(G), expected)  # same code path: bitwise


def test_float64_matches_polynomial_oracle():
    # fp64 everywhere: only rounding at 1e-16 amplified by the polynomials;
    # measured worst 1.4e-14 over the 16 shape pairs, tolerance x ~7.
    with jax.enable_x64(True):
        for m, n in [(8, 48), (32, 32), (48, 16)]:
            G = gaussian(m * n, m, n, dtype=np.float64)
            for coeffs, norm_scale in SCHEDULES.values():
                out = newton_schulz(G, 5, coeffs, compute_dtype=jnp.float64, norm_scale=norm_scale)
                assert out.dtype == jnp.float64
                # fp64: u·Π|a_k| ≈ 1.1e-16·987 ≈ 1e-13 bound (tolerances.py reasoning); measured 1.4e-14
                assert rel_err(out, polynomial_oracle(G, coeffs, 5, norm_scale=norm_scale)) <= 1e-13


def test_bf16_coefficients_are_float32():
    """Each fused op is computed in f32 with f32 coefficients, rounded to bf16 once.

    With b = c = 0 a step is X ← rnd_bf16(a·X), so the result pins down
    whether `a` was used as f32 3.4445 or as its bf16 rounding 3.4375.
    """
    G = gaussian(1, 16, 32)
    X0 = np.asarray(newton_schulz(G, 1, (1.0, 0.0, 0.0)))  # rnd(1·X0) = X0, the bf16 start
    out = np.asarray(newton_schulz(G, 1, (3.4445, 0.0, 0.0)))
    expected = (np.float32(3.4445) * X0).astype(ml_dtypes.bfloat16).astype(np.float32)
    weak_bf16 = (np.float32(ml_dtypes.bfloat16(3.4445)) * X0).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(out, expected)  # one f32 multiply and one rounding: bitwise
    assert not np.array_equal(expected, weak_bf16)  # the test can tell the two apart


def well_conditioned(seed, m, n):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((U * rng.uniform(0.5, 1.0, k)) @ V.T).astype(np.float32)


@examples()
@given(m=DIMS, n=DIMS, seed=SEEDS)
def test_convergent_coefficients_reach_exact_polar(m, n, seed):
    # p(s) = 2s - 1.5s^3 + 0.5s^5 has p(1) = 1, p'(1) = 0: it converges to 1
    # for every s in (0, 1]. cond <= 2 and n <= 48 put every normalized s
    # above 0.07, so 25 steps converge fully; what remains is f32 rounding:
    # measured worst 2.1e-7 over the 16 shape pairs, tolerance x ~5.
    G = well_conditioned(seed, m, n)
    out = newton_schulz(G, 25, (2.0, -1.5, 0.5), compute_dtype=jnp.float32)
    assert rel_err(out, exact_polar(G)) <= 1e-6


@examples(0.4)  # batching does not care about sizes: two keep compiles few
@given(m=st.sampled_from([8, 32]), n=st.sampled_from([8, 32]), seed=SEEDS,
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_batch_equals_loop(m, n, seed, dtype):
    G = gaussian(seed, 2, 3, m, n)
    batched = newton_schulz(G, compute_dtype=dtype)
    looped = np.stack([[np.asarray(newton_schulz(G[i, j], compute_dtype=dtype)) for j in range(3)] for i in range(2)])
    # Same per-matrix math, but XLA's batched matmul kernel sums in another
    # order than the single-matrix one, and the iteration amplifies that
    # rounding noise. Measured worst rel Frobenius difference over the 16
    # shape pairs x 4 seeds: f32 1.2e-6, bf16 6.2e-3 (a flipped bf16 rounding
    # grows through 5 steps); tolerances ~x5-8. A mixed-up batch is O(1).
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert rel_err(batched, looped.astype(np.float64)) <= tol


@examples(0.4)
@given(m=DIMS, n=DIMS, seed=SEEDS, dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_tall_equals_transpose_of_wide(m, n, seed, dtype):
    G = gaussian(seed, m, n)
    direct = np.asarray(newton_schulz(G, compute_dtype=dtype)).T.astype(np.float64)
    # Both calls iterate on the same wide matrix, but ‖G‖_F is summed in
    # another order and the matmuls see another memory layout, so roundings
    # differ. Measured worst rel Frobenius difference (16 shape pairs x 24
    # matrices): f32 1.6e-6, bf16 3.3e-2 (bf16 runs differ from each other
    # about as much as from the oracle); tolerances ~x3-6. A missing
    # transpose-back is O(1) or a shape error.
    tol = 1e-5 if dtype == jnp.float32 else 1e-1
    assert rel_err(newton_schulz(G.T, compute_dtype=dtype), direct) <= tol


def test_coefficient_schedule_repeats_last_triple_and_truncates():
    G = gaussian(2, 16, 8)
    padded = POLAR_EXPRESS_COEFFS + (POLAR_EXPRESS_COEFFS[-1],) * 2
    np.testing.assert_array_equal(newton_schulz(G, 7, POLAR_EXPRESS_COEFFS), newton_schulz(G, 7, padded))
    np.testing.assert_array_equal(newton_schulz(G, 2, POLAR_EXPRESS_COEFFS),
                                  newton_schulz(G, 2, POLAR_EXPRESS_COEFFS[:2]))
    np.testing.assert_array_equal(newton_schulz(G, 3, NS5_COEFFS), newton_schulz(G, 3, [NS5_COEFFS] * 3))
    np.testing.assert_array_equal(
        polynomial_oracle(G, POLAR_EXPRESS_COEFFS, 7), polynomial_oracle(G, padded, 7)
    )


def test_dtype_shape_and_zero_matrix():
    G = jnp.asarray(gaussian(3, 4, 16, 8), jnp.bfloat16)
    out = newton_schulz(G)
    assert out.dtype == jnp.bfloat16 and out.shape == (4, 16, 8)
    np.testing.assert_array_equal(newton_schulz(np.zeros((8, 16), np.float32)), 0.0)  # eps keeps 0 → 0


def test_jit_matches_eager_and_nonfinite_propagates_under_jit():
    G = gaussian(4, 16, 32)
    f = jax.jit(functools.partial(newton_schulz, steps=5, compute_dtype=jnp.float32))
    # XLA may fuse differently from op-by-op dispatch; a few f32 ulps at O(1).
    np.testing.assert_allclose(f(G), newton_schulz(G, compute_dtype=jnp.float32), rtol=0, atol=1e-5)
    G[0, 0] = np.nan
    assert np.isnan(np.asarray(f(G))).any()  # documented: traced input is not checked


def test_exact_polar_is_orthogonal():
    for m, n in [(8, 32), (32, 8)]:
        Q = exact_polar(gaussian(5, m, n))
        assert Q.dtype == np.float64
        k = min(m, n)
        gram = Q @ Q.T if m <= n else Q.T @ Q
        np.testing.assert_allclose(gram, np.eye(k), atol=1e-12)  # fp64 SVD: ~1e-15 off


BAD_MATRICES = [
    pytest.param(np.ones((4, 4), np.int32), "floating", id="int"),
    pytest.param(np.ones((4,), np.float32), "ndim", id="1d"),
    pytest.param(np.ones((0, 4), np.float32), "empty", id="no-rows"),
    pytest.param(np.ones((4, 0), np.float32), "empty", id="no-cols"),
    pytest.param(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), "NaN or inf", id="nan"),
    pytest.param(np.array([[1.0, np.inf], [0.0, 1.0]], np.float32), "NaN or inf", id="inf"),
]
ORTHOGONALIZERS = [
    pytest.param(newton_schulz, id="newton_schulz"),
    pytest.param(polar_express, id="polar_express"),
    pytest.param(exact_polar, id="exact_polar"),
    pytest.param(functools.partial(polynomial_oracle, coeffs=NS5_COEFFS, steps=5), id="polynomial_oracle"),
]


@pytest.mark.parametrize("fn", ORTHOGONALIZERS)
@pytest.mark.parametrize("G, message", BAD_MATRICES)
def test_bad_matrix_raises(fn, G, message):
    with pytest.raises(ValueError, match=message):
        fn(G)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"coeffs": (1.0, 2.0)}, "triple"),
        ({"coeffs": ((1.0, 2.0, 3.0), (1.0, 2.0))}, "triple"),
        ({"coeffs": ("a", "b", "c")}, "triple"),
        ({"coeffs": ()}, "empty"),
        ({"coeffs": 3.0}, "triple"),
    ],
)
def test_bad_schedule_raises(kwargs, message):
    G = gaussian(6, 8, 8)
    with pytest.raises(ValueError, match=message):
        newton_schulz(G, **kwargs)
    with pytest.raises(ValueError, match=message):
        polynomial_oracle(G, kwargs.get("coeffs", NS5_COEFFS), kwargs.get("steps", 5))


# The bad inputs shared with the torch side (tests/orthogonalizer_bad_inputs.py), through the
# public entry point with default arguments.


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_value_error(case):
    x, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        newton_schulz(jnp.asarray(x))


def test_bad_schedules_raise():
    arr = jnp.asarray(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(arr, steps=0)
    with pytest.raises(ValueError, match="3|triple"):
        newton_schulz(arr, coeffs=((1.0, 2.0),))
