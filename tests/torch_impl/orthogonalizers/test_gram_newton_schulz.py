"""torch_impl.orthogonalizers.gram_newton_schulz against newton_schulz and the fp64 polynomial_oracle
(.specs/orthogonalizers.md §3, §8). torch only; the JAX side's tests are
tests/jax_reference/orthogonalizers/test_gram_newton_schulz.py, the two compared in parity_tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import FEW_DIMS, KINDS, SEEDS, bf16_rounded, examples, matrix, rel_err
from tests.rounding_bounds import FP32_U, FP64_U, gram_condition, ns_condition, tolerance
from torch_impl.orthogonalizers.gram_newton_schulz import RESTART_AFTER, check_restarts, gram_newton_schulz
from torch_impl.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    coefficient_schedule,
    newton_schulz,
    polar_express,
    polynomial_oracle,
)
from torch_impl.orthogonalizers.schedules import CANS_COEFFS

PE_SCALE = 1 / POLAR_EXPRESS_NORM_SCALE
KAPPA_GRAM = gram_condition(POLAR_EXPRESS_COEFFS, RESTART_AFTER, PE_SCALE)  # ≈ 6.8e3
KAPPA_NS = ns_condition(POLAR_EXPRESS_COEFFS, PE_SCALE)  # ≈ 989


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def pe_oracle(G: np.ndarray) -> np.ndarray:
    return f64(polynomial_oracle(torch.from_numpy(G), POLAR_EXPRESS_COEFFS, 5, norm_scale=POLAR_EXPRESS_NORM_SCALE))


def gram(G: np.ndarray, **kw) -> torch.Tensor:
    return gram_newton_schulz(torch.from_numpy(G), **kw)


@examples()
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS, kind=KINDS, batch=st.sampled_from([(), (2,)]))
def test_fp32_matches_oracle_and_newton_schulz(m, n, seed, kind, batch):
    G = np.stack([matrix(kind, seed + i, m, n) for i in range(int(np.prod(batch, dtype=int)))])
    G = G.reshape(*batch, m, n)
    out = gram(G, compute_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (*batch, m, n)
    # 2·u·κ_gram = 8.1e-4 (R's roundings, Daleckii–Krein, rounding_bounds.py). Measured torch worst
    # 4.4e-4 over 16 shape pairs × 3 kinds × 4 seeds (rank-deficient 8×16; JAX: 4.2e-4; NS-PE on
    # the same sweep 4.0e-5).
    assert rel_err(f64(out), pe_oracle(G)) <= tolerance(FP32_U, KAPPA_GRAM)
    # Each of Gram NS and NS is within its bound of the same oracle, so they differ by at most the sum.
    ns = newton_schulz(torch.from_numpy(G), 5, POLAR_EXPRESS_COEFFS, compute_dtype=torch.float32,
                       norm_scale=POLAR_EXPRESS_NORM_SCALE)
    assert rel_err(f64(out), f64(ns)) <= tolerance(FP32_U, KAPPA_GRAM + KAPPA_NS)


def test_float64_equals_newton_schulz_for_any_restarts():
    # In exact arithmetic Gram NS is NS whatever the restarts (spec §3's claim); in fp64 the gap is
    # 2·u·(κ_gram + κ_NS) with u = 2^-53 (≤ 5.3e-11 for no restart, 1.7e-12 for (2,)).
    for (m, n), kind in zip([(8, 32), (32, 8)], ["gaussian", "rank_deficient"]):
        G = matrix(kind, m + n, m, n, np.float64)
        ns = f64(newton_schulz(torch.from_numpy(G), 5, POLAR_EXPRESS_COEFFS, compute_dtype=torch.float64,
                               norm_scale=1.01))
        for restart_after in [(), (1,), (2,), (1, 2, 3, 4), (3, 9)]:
            kappa = gram_condition(POLAR_EXPRESS_COEFFS, restart_after, PE_SCALE) + KAPPA_NS
            out = gram(G, compute_dtype=torch.float64, restart_after=restart_after)
            assert out.dtype == torch.float64
            assert rel_err(f64(out), ns) <= tolerance(FP64_U, kappa), restart_after
            assert rel_err(f64(out), pe_oracle(G)) <= tolerance(FP64_U, kappa), restart_after


def test_float64_any_schedule_and_step_count():
    # The function takes any schedule: NS5 (one triple) for 7 steps, CANS with its last repeating.
    G = matrix("gaussian", 1, 8, 32, np.float64)
    for coeffs, steps in [(NS5_COEFFS, 7), (CANS_COEFFS, 6), (POLAR_EXPRESS_COEFFS, 2)]:
        out = gram(G, steps=steps, coeffs=coeffs, compute_dtype=torch.float64, norm_scale=1.0)
        schedule = coefficient_schedule(coeffs, steps)
        kappa = gram_condition(schedule, RESTART_AFTER) + ns_condition(schedule)  # 2·u·κ, u = 2^-53
        assert rel_err(f64(out), f64(polynomial_oracle(torch.from_numpy(G), coeffs, steps))) <= \
            tolerance(FP64_U, kappa)


@examples(0.4)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_bf16_within_band(m, n, seed):
    # On U·diag(s)·Vᵀ, s ∈ [0.1, 1], against the oracle on the bf16-rounded input; a bf16 request
    # computes the Gram iteration in float16 (spec §3), squares run bf16 newton_schulz. Band 0.064 of
    # spec §8 (2 × the worst over 200 seeds × 6 shapes, 0.032 torch, 0.031 JAX). Measured torch worst
    # over the 128 inputs of the other bands (16 shape pairs × seeds 0..7): 0.028 rectangular
    # (float16 Gram NS, 8×48), 0.043 square (bf16 NS-PE, 8×8).
    G = matrix("well_conditioned", seed, m, n)
    out = gram(G)
    assert out.dtype == torch.float32
    assert rel_err(f64(out), pe_oracle(bf16_rounded(G))) <= 0.064


def test_restarts_are_what_keeps_16_bit_finite():
    """Rounding makes R's null eigenvalues slightly negative and the R update grows them by ~a² per
    step: without a restart a rank-deficient input computed in 16 bits (float16, spec §3) blows up,
    with the default restart after step 2 it stays O(1) like NS's own bf16 null-space noise. Torch
    measured on this input: 0.67 with the restart (NS-PE in bf16: 0.85; bound 2.0 as JAX's, where it
    is 0.19), nan without."""
    G = matrix("rank_deficient", 7, 8, 32)
    ref = pe_oracle(bf16_rounded(G))
    assert rel_err(f64(gram(G)), ref) <= 2.0
    assert not rel_err(f64(gram(G, restart_after=())), ref) <= 1e3  # inf/nan count as blown up


def test_bf16_runs_in_float16_and_float16_range_is_checked():
    """spec §3: a bf16 request computes the Gram iteration in float16 (bitwise what float16 gives;
    the result in G's dtype), square inputs stay bf16 newton_schulz; a float16 segment whose Q could
    pass 2^14 (Π|a_k| over the steps between restarts) is refused, naming the steps."""
    for G in (torch.from_numpy(matrix("well_conditioned", 8, 8, 32)),
              torch.from_numpy(matrix("well_conditioned", 8, 32, 8)).bfloat16()):
        out = gram_newton_schulz(G)
        assert out.dtype == G.dtype and torch.equal(out, gram_newton_schulz(G, compute_dtype=torch.float16))
        assert not torch.equal(out, gram_newton_schulz(G, compute_dtype=torch.float32))  # it is 16-bit
    square = torch.from_numpy(matrix("gaussian", 9, 16, 16)).bfloat16()
    assert torch.equal(gram_newton_schulz(square), polar_express(square))
    G = torch.from_numpy(matrix("well_conditioned", 8, 8, 32))
    # Polar Express with the restart after step 2: Q's null-direction factor 33, then 30 at step 5,
    # and a_5 = 2.35 per extra step: past 2^14 at step 13.
    with pytest.raises(ValueError, match=r"float16.*steps 3\.\.13 .*restart"):
        gram_newton_schulz(G, steps=15)
    with pytest.raises(ValueError, match=r"float16.*steps 1\.\.9 .*restart"):
        gram_newton_schulz(G, steps=9, restart_after=(), compute_dtype=torch.float16)
    assert gram_newton_schulz(G, steps=15, compute_dtype=torch.float32).dtype == torch.float32  # fp32: no limit
    assert torch.isfinite(gram_newton_schulz(G, steps=12)).all()  # 12 steps: Q ≤ 1.2e4 < 2^14
    assert torch.isfinite(gram_newton_schulz(torch.from_numpy(matrix("gaussian", 9, 16, 16)), steps=15)).all()


def test_square_falls_back_to_newton_schulz():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        G = torch.from_numpy(matrix("gaussian", 2, 32, 32))
        assert torch.equal(gram_newton_schulz(G, compute_dtype=dtype),
                           polar_express(G, compute_dtype=dtype))  # same code path: bitwise
        G = torch.from_numpy(matrix("gaussian", 3, 2 * 8, 8).reshape(2, 8, 8))
        assert torch.equal(gram_newton_schulz(G, 7, NS5_COEFFS, compute_dtype=dtype, norm_scale=1.0),
                           newton_schulz(G, 7, NS5_COEFFS, compute_dtype=dtype, norm_scale=1.0))
        # ... and a square matrix's restart positions still have to be valid
        with pytest.raises(ValueError, match="restart_after"):
            gram_newton_schulz(G, restart_after=(0,))


def test_tall_is_transpose_of_wide_and_batch_equals_loop():
    G = matrix("gaussian", 3, 2 * 3 * 8, 32).reshape(2, 3, 8, 32)
    batched = f64(gram(G, compute_dtype=torch.float32))
    looped = np.stack([[f64(gram(G[i, j], compute_dtype=torch.float32)) for j in range(3)] for i in range(2)])
    tall = f64(gram(np.ascontiguousarray(np.swapaxes(G, -1, -2)), compute_dtype=torch.float32))
    # Same math each way, other summation orders: each within 2·u·κ_gram of the oracle, so 2× apart.
    tol = 2 * tolerance(FP32_U, KAPPA_GRAM)
    assert rel_err(looped, batched) <= tol
    assert rel_err(np.swapaxes(tall, -1, -2), batched) <= tol
    # A non-contiguous (transposed view) input is the same matrix
    view = gram_newton_schulz(torch.from_numpy(G).mT, compute_dtype=torch.float32)
    assert rel_err(f64(view), tall) <= tol


def test_zero_matrix_dtypes_and_input_kept():
    assert torch.equal(gram_newton_schulz(torch.zeros(8, 32)), torch.zeros(8, 32))  # eps keeps 0 → 0
    assert torch.equal(gram_newton_schulz(torch.zeros(32, 8)), torch.zeros(32, 8))
    G = torch.from_numpy(matrix("gaussian", 4, 8, 32))
    before = G.clone()
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        out = gram_newton_schulz(G.to(dtype), compute_dtype=torch.float32)
        assert out.dtype == dtype and out.shape == (8, 32)
    assert torch.equal(G, before)


def test_check_finite_false_skips_the_check():
    G = torch.ones(8, 16)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gram_newton_schulz(G)
    assert torch.isnan(gram_newton_schulz(G, check_finite=False)).any()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    x, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        gram_newton_schulz(torch.from_numpy(x))


@pytest.mark.parametrize("bad", [(0,), 2, ("2",), (1.5,), (True,), None, (-1,)])
def test_bad_restart_after_raises(bad):
    with pytest.raises(ValueError, match=r"restart_after must be a sequence of integers >= 1"):
        gram_newton_schulz(torch.ones(4, 8), restart_after=bad)
    with pytest.raises(ValueError, match=r"restart_after must be a sequence of integers >= 1"):
        check_restarts(bad)


def test_restart_positions():
    assert check_restarts((2,)) == {2} and check_restarts([]) == frozenset() and RESTART_AFTER == (2,)
    assert check_restarts([np.int64(3), 1]) == {1, 3}  # numpy integers count as integers


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps"), ({"coeffs": (1.0, 2.0)}, "3 numbers"),
                                             ({"coeffs": ()}, "empty")])
def test_bad_schedule_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gram_newton_schulz(torch.ones(4, 8), **kwargs)


@pytest.mark.parametrize("shape", [(4, 8), (8, 8)])
def test_non_floating_compute_dtype_raises(shape):
    from torch_impl.orthogonalizers.aol import aol
    from torch_impl.orthogonalizers.newton_schulz import newton_schulz
    from torch_impl.orthogonalizers.schedules import cubic

    for fn in (gram_newton_schulz, newton_schulz, aol, cubic):  # used to return zeros silently
        with pytest.raises(ValueError, match="compute_dtype must be a floating torch.dtype, got torch.int32"):
            fn(torch.ones(shape), compute_dtype=torch.int32)
