"""torch_impl.orthogonalizers.aol (Turbo-Muon) against its fp64 oracle and the AOL formula done by hand
(.specs/orthogonalizers.md §4, §8). torch only; the JAX side's tests are tests/jax_reference/orthogonalizers/test_aol.py
(which also compares with optax), the two compared in parity_tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import DIMS, FEW_DIMS, KINDS, SEEDS, bf16_rounded, examples, matrix, rel_err
from tests.rounding_bounds import FP32_U, FP64_U, ns_condition, tolerance
from torch_impl.orthogonalizers.aol import aol, aol_oracle, aol_precondition
from torch_impl.orthogonalizers.newton_schulz import NS5_COEFFS
from torch_impl.orthogonalizers.schedules import SCHEDULES, YOU_COEFFS

TURBO = SCHEDULES["aol"].triples(4)  # You's schedule minus its first step
KAPPA = ns_condition(TURBO, 1.0)  # ≈ 121 = Π|a_k|: AOL's X₀ has ‖X₀‖₂ ≤ 1
# 2·u·κ = 1.4e-5. Measured torch worst 5.3e-6 (rank-deficient 8×16) over 16 shape pairs × 3 kinds
# × 4 seeds; Gaussian 6.6e-7 (JAX: 4.3e-6, 6.9e-7).
TOL32 = tolerance(FP32_U, KAPPA)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def oracle(G: np.ndarray, **kw) -> np.ndarray:
    return f64(aol_oracle(torch.from_numpy(G), **kw))


def run(G: np.ndarray, **kw) -> torch.Tensor:
    return aol(torch.from_numpy(G), **kw)


def hand_precondition(G: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """spec §4 in numpy fp64: rows of the wide orientation scaled by 1/sqrt(max(Σ_j |A_ij|, eps))."""
    W = G if G.shape[0] <= G.shape[1] else G.T
    d = 1 / np.sqrt(np.maximum(np.abs(W @ W.T).sum(axis=1), eps))
    X0 = d[:, None] * W
    return X0 if G.shape[0] <= G.shape[1] else X0.T


@examples(0.6)
@given(m=DIMS, n=DIMS, seed=SEEDS, kind=KINDS)
def test_precondition_bounds_the_spectral_norm(m, n, seed, kind):
    # ‖D X‖₂ ≤ 1 exactly (spec §4's proof); fp64 SVD error ~1e-15, so 1e-12 of slack.
    G = matrix(kind, seed, m, n, np.float64) * 10.0 ** (seed % 7 - 3)  # any scale
    X0 = f64(aol_precondition(torch.from_numpy(G)))
    assert X0.shape == (m, n)
    assert np.linalg.norm(X0, 2) <= 1 + 1e-12
    # The rows of the wide orientation are rescaled (D on the left; columns G·D when tall) ...
    ratio = X0 / G if m <= n else (X0 / G).T
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-12)
    assert np.all(ratio > 0)
    # ... by the formula: fp64 both sides, same sums in other orders (~1e-15 relative).
    np.testing.assert_allclose(X0, hand_precondition(G), rtol=1e-12, atol=0)


def test_precondition_eps_floor_and_zero():
    # Row sums below eps are floored: a tiny matrix is scaled by 1/sqrt(eps), not blown up to norm 1.
    G = np.full((2, 4), 1e-6)  # A_ij = 4e-12, row sums 8e-12 < eps = 1e-7
    np.testing.assert_allclose(f64(aol_precondition(torch.from_numpy(G))), G / np.sqrt(1e-7), rtol=1e-14)
    np.testing.assert_allclose(f64(aol_precondition(torch.from_numpy(G), eps=1e-12)), hand_precondition(G, 1e-12),
                               rtol=1e-14)
    assert torch.equal(aol_precondition(torch.zeros(3, 5)), torch.zeros(3, 5, dtype=torch.float64))


@examples()
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS, kind=KINDS, batch=st.sampled_from([(), (2,)]))
def test_fp32_matches_oracle(m, n, seed, kind, batch):
    G = np.stack([matrix(kind, seed + i, m, n) for i in range(int(np.prod(batch, dtype=int)))])
    G = G.reshape(*batch, m, n)
    out = run(G, compute_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (*batch, m, n)
    assert rel_err(f64(out), oracle(G)) <= TOL32


def test_float64_matches_oracle():
    # 2·u·κ with u = 2^-53: 2.7e-14.
    for (m, n), kind in zip([(8, 48), (32, 32), (48, 16)], ["gaussian", "rank_deficient", "ill_conditioned"]):
        G = matrix(kind, m * n, m, n, np.float64)
        out = run(G, compute_dtype=torch.float64)
        assert out.dtype == torch.float64
        assert rel_err(f64(out), oracle(G)) <= tolerance(FP64_U, KAPPA)


def test_oracle_is_the_polynomials_on_the_preconditioned_matrix():
    """aol_oracle by hand: NS steps X ← aX + (bA + cA²)X in fp64 on X₀ = hand_precondition(G)."""
    G = matrix("gaussian", 4, 16, 8, np.float64)
    X = hand_precondition(G).T  # wide
    for a, b, c in TURBO:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    # fp64 both ways (SVD vs matmuls): 2·u·κ with u = 2^-53, 2.7e-14
    assert rel_err(oracle(G), X.T) <= tolerance(FP64_U, KAPPA)


@examples(0.4)
@given(m=FEW_DIMS, n=FEW_DIMS, seed=SEEDS)
def test_bf16_within_band(m, n, seed):
    # On U·diag(s)·Vᵀ, s ∈ [0.1, 1], against the oracle on the bf16-rounded input. Band 0.017 of spec
    # §8 (2 × the JAX worst over 128 inputs, 0.0084). Measured torch worst over the same 128 (16 shape
    # pairs × seeds 0..7): 0.0075.
    G = matrix("well_conditioned", seed, m, n)
    assert rel_err(f64(run(G)), oracle(bf16_rounded(G))) <= 0.017


def test_steps_take_the_last_triples():
    G = matrix("gaussian", 1, 8, 32)
    for steps in (1, 2, 4, 5):
        assert torch.equal(run(G, steps=steps), run(G, steps=steps, coeffs=YOU_COEFFS[5 - steps:]))
        assert torch.equal(aol_oracle(torch.from_numpy(G), steps=steps),
                           aol_oracle(torch.from_numpy(G), steps=steps, coeffs=YOU_COEFFS[5 - steps:]))
    assert torch.equal(run(G), run(G, steps=4))  # default 4 (Turbo-Muon)
    # Explicit coefficients: newton_schulz's rules (one triple repeats), any number of steps.
    ns5 = [NS5_COEFFS] * 7
    assert rel_err(f64(run(G, steps=7, coeffs=NS5_COEFFS, compute_dtype=torch.float32)),
                   oracle(G, steps=7, coeffs=NS5_COEFFS)) <= tolerance(FP32_U, ns_condition(ns5))
    for steps in (0, 6):
        with pytest.raises(ValueError, match=r"'aol' supports 1 <= steps <= 5"):
            run(G, steps=steps)
        with pytest.raises(ValueError, match=r"'aol' supports 1 <= steps <= 5"):
            aol_oracle(torch.from_numpy(G), steps=steps)


def test_scale_invariance_and_zero():
    # AOL has no Frobenius normalisation: D(cG)·cG = D(G)·G exactly, unless the eps floor binds;
    # in fp32 each run is within 2·u·κ of the same oracle, so 2× apart.
    G = matrix("gaussian", 2, 8, 32)
    base = f64(run(G, compute_dtype=torch.float32))
    for c in (1e-2, 1e3):
        assert rel_err(f64(run(G * np.float32(c), compute_dtype=torch.float32)), base) <= 2 * TOL32
    assert torch.equal(aol(torch.zeros(8, 16)), torch.zeros(8, 16))
    assert torch.equal(aol(torch.zeros(16, 8)), torch.zeros(16, 8))
    # A zero row (rank deficiency in the small side) stays zero.
    G[3] = 0.0
    assert torch.equal(run(G, compute_dtype=torch.float32)[3], torch.zeros(32))


def test_tall_is_transpose_of_wide_batch_and_dtype():
    G = matrix("gaussian", 3, 2 * 8, 32).reshape(2, 8, 32)
    batched = f64(run(G, compute_dtype=torch.float32))
    looped = np.stack([f64(run(G[i], compute_dtype=torch.float32)) for i in range(2)])
    tall = f64(run(np.ascontiguousarray(np.swapaxes(G, -1, -2)), compute_dtype=torch.float32))
    view = f64(aol(torch.from_numpy(G).mT, compute_dtype=torch.float32))  # a non-contiguous tall input
    for other in (looped, np.swapaxes(tall, -1, -2), np.swapaxes(view, -1, -2)):  # other orders: 2× the bound
        assert rel_err(other, batched) <= 2 * TOL32
    # The oracle is transpose-equivariant for non-square G (exactly, up to fp64 SVD noise)
    np.testing.assert_allclose(oracle(np.swapaxes(G, -1, -2).copy()), np.swapaxes(oracle(G), -1, -2), atol=1e-12)
    for dtype in (torch.bfloat16, torch.float64):
        out = aol(torch.from_numpy(G).to(dtype), compute_dtype=torch.float32)
        assert out.dtype == dtype and out.shape == (2, 8, 32)


def test_square_is_not_transpose_equivariant():
    """A square matrix counts as wide: AOL scales its rows, its transpose's columns (spec §4), so
    aol(Gᵀ) ≠ aol(G)ᵀ beyond rounding (fp32 differences would be ≤ 2·TOL32 = 2.8e-5)."""
    S = matrix("gaussian", 5, 16, 16) * np.logspace(0, -1, 16, dtype=np.float32)[:, None]
    straight = f64(run(S, compute_dtype=torch.float32))
    flipped = f64(run(np.ascontiguousarray(S.T), compute_dtype=torch.float32)).T
    assert rel_err(flipped, straight) > 1e-3
    np.testing.assert_allclose(f64(aol_precondition(torch.from_numpy(S))), hand_precondition(S.astype(np.float64)),
                               rtol=1e-12)  # rows of S: fp64 both sides, other summation orders (~1e-15)


def test_check_finite_false_skips_the_check():
    G = torch.ones(8, 16)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        aol(G)
    assert torch.isnan(aol(G, check_finite=False)).any()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises(case):
    x, message = BAD_INPUTS[case]
    for fn in (aol, aol_oracle, aol_precondition):
        with pytest.raises(ValueError, match=message):
            fn(torch.from_numpy(x))
