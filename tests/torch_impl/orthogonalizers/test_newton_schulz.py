"""torch_impl.orthogonalizers.newton_schulz on its own: bad input, schedules, dtype and shape, the exact oracles.

Its numerics against fp64 oracles and against the JAX reference are in
parity_tests/test_orthogonalize_parity.py (the JAX side's own unit tests:
tests/jax_reference/orthogonalizers/test_newton_schulz.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from torch_impl.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    coefficient_schedule,
    exact_polar,
    newton_schulz,
    polar_express,
    polynomial_oracle,
)

# ---- bad input -------------------------------------------------------------------------



@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_value_error(case):
    x, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        newton_schulz(torch.from_numpy(x))


def test_bad_schedules_raise():
    arr = torch.from_numpy(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(arr, steps=0)
    with pytest.raises(ValueError, match="3|triple"):
        newton_schulz(arr, coeffs=((1.0, 2.0),))


def test_input_is_not_mutated_and_dtype_is_kept():
    G = torch.randn(2, 16, 8)
    before = G.clone()
    for f in (newton_schulz, polar_express):
        out = f(G)
        assert torch.equal(G, before)
        assert out.dtype == G.dtype and out.shape == G.shape


def test_check_finite_false_skips_the_check():
    """Muon checks gradients once per step and calls the orthogonalizers with
    check_finite=False: a NaN then propagates instead of raising."""
    G = torch.ones(4, 8)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        newton_schulz(G)
    assert torch.isnan(newton_schulz(G, check_finite=False)).any()


# ---- schedules -------------------------------------------------------------------------

def test_coefficient_schedule_repeats_last_triple_and_truncates():
    assert coefficient_schedule(NS5_COEFFS, 3) == [NS5_COEFFS] * 3
    pe = coefficient_schedule(POLAR_EXPRESS_COEFFS, 7)
    assert pe[:5] == list(POLAR_EXPRESS_COEFFS) and pe[5:] == [POLAR_EXPRESS_COEFFS[-1]] * 2
    assert coefficient_schedule(POLAR_EXPRESS_COEFFS, 2) == list(POLAR_EXPRESS_COEFFS[:2])
    G = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    padded = POLAR_EXPRESS_COEFFS + (POLAR_EXPRESS_COEFFS[-1],) * 2
    # the same triples run through the same ops: bitwise
    assert torch.equal(newton_schulz(G, 7, POLAR_EXPRESS_COEFFS), newton_schulz(G, 7, padded))
    assert torch.equal(polynomial_oracle(G, POLAR_EXPRESS_COEFFS, 7), polynomial_oracle(G, padded, 7))


@pytest.mark.parametrize("coeffs, message", [((), "empty"), ((1.0, 2.0), "3 numbers"),
                                             (("a", "b", "c"), "3 numbers"), (((1.0, 2.0, 3.0), (1.0,)), "3 numbers")])
def test_bad_coefficients_raise(coeffs, message):
    with pytest.raises(ValueError, match=message):
        coefficient_schedule(coeffs, 5)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        coefficient_schedule(NS5_COEFFS, steps)


def test_polar_express_is_newton_schulz_with_its_schedule():
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    expected = newton_schulz(G, 5, POLAR_EXPRESS_COEFFS, norm_scale=POLAR_EXPRESS_NORM_SCALE)
    assert torch.equal(polar_express(G), expected)  # same code path: bitwise


# ---- dtype, shape, the zero matrix and the exact oracles -------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_dtype_and_shape_follow_the_input(dtype):
    G = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = newton_schulz(G, compute_dtype=torch.float32)
    assert out.dtype == dtype and out.shape == G.shape


def test_zero_matrix_maps_to_zero():
    assert torch.equal(newton_schulz(torch.zeros(8, 16)), torch.zeros(8, 16))  # eps keeps 0 → 0


def test_exact_polar_is_orthogonal():
    for m, n in [(8, 32), (32, 8)]:
        Q = exact_polar(torch.randn(m, n, generator=torch.Generator().manual_seed(5)))
        assert Q.dtype == torch.float64
        gram = Q @ Q.T if m <= n else Q.T @ Q
        # fp64 SVD: ~1e-15 off the identity
        torch.testing.assert_close(gram, torch.eye(min(m, n), dtype=torch.float64), rtol=0, atol=1e-12)
