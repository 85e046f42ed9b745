"""torch_impl.orthogonalizers.balance: MuonEq's row equilibration and Muon+'s Frobenius renormalization
(spec §6), against numpy fp64 versions of nanochat's, and their composition around an orthogonalizer."""


from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given

from tests.orthogonalizer_cases import (
    FEW_DIMS,
    SEEDS,
    examples,
    matrix,
    muon_plus,
    nanochat_row_equilibrate,
    rel_err,
)
from tests.rounding_bounds import equilibrate_bound
from torch_impl.orthogonalizers.balance import balanced, frobenius_renormalize, row_equilibrate


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


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
