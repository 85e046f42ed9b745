"""Gram Newton-Schulz: Newton-Schulz iterated on the small Gram matrix (.specs/orthogonalizers.md §3).

Zhang, Amsel, Chen, Dao 2026 (https://github.com/Dao-AILab/gram-newton-schulz,
https://dao-ailab.github.io/blog/2026/gram-newton-schulz/). For a wide X (s × l, s ≤ l) each NS
step is X ← P_k X with P_k = a_k I + b_k R + c_k R², R = X Xᵀ (s × s). The P_k of a run are
polynomials in its starting R, so they commute and the run can be carried on s × s matrices:

    R ← X₀X₀ᵀ, Q unset
    step k (1-based), triple (a, b, c):
        Z = b R + c R²
        Q = Z + a I                    first step of a segment
        Q = a Q + Q Z   (= Q P_k)      otherwise
        RZ = a R + R Z, R = a RZ + Z RZ   (= P_k R P_k)   unless the segment ends after step k
    restart after step j (j in restart_after):  X ← Q X,  R ← X Xᵀ,  Q unset
    end:  X ← Q X

In exact arithmetic the result is newton_schulz's with the same schedule and normalisation, and
the s × l matrix is touched only to form R, at restarts and at the end: per step ~8s³ FLOPs
instead of NS's 4s²l + 2s³. The restart (the authors' default: after step 2) re-forms R from X:
rounding makes small eigenvalues of R negative, and the later polynomials amplify them. Square
inputs run newton_schulz itself, as the authors' code does (no saving when s = l).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from torch_impl.orthogonalizers.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    Coeffs,
    _check_matrix_input,
    coefficient_schedule,
    from_wide,
    gram_polynomial,
    newton_schulz,
    normalized_wide,
)

RESTART_AFTER: tuple[int, ...] = (2,)  # GramNewtonSchulz's default gram_newton_schulz_reset_iterations=[2]


def check_restarts(restart_after) -> frozenset[int]:
    """The restart positions as a set; ValueError unless a sequence of integers >= 1."""
    try:
        items = tuple(restart_after)
    except TypeError:
        items = None
    if items is None or not all(isinstance(j, numbers.Integral) and not isinstance(j, bool) and j >= 1
                                for j in items):
        raise ValueError(f"restart_after must be a sequence of integers >= 1 (restart after that many steps; "
                         f"e.g. (2,), or () for none), got {restart_after!r}")
    return frozenset(int(j) for j in items)


FP16_Q_LIMIT = 2.0**14  # a quarter of float16's largest value, 65504


def check_fp16_range(schedule: Sequence[Coeffs], restarts: frozenset[int]) -> None:
    """ValueError when Q could overflow float16: on a null direction of R, Q's eigenvalue is the
    product of the segment's a_k (Polar Express: 33 and 30 with the default restart; ~1e5 for
    15 steps without one). Restarts bound it."""
    product, start = 1.0, 0
    for k, (a, _, _) in enumerate(schedule):
        if k in restarts:
            product, start = 1.0, k
        product *= abs(a)
        if product > FP16_Q_LIMIT:
            raise ValueError(f"gram_newton_schulz in float16: the steps {start + 1}..{k + 1} without a restart "
                             f"multiply Q by up to {product:.3g}, past float16's range; add a restart "
                             f"(restart_after) within them or compute in float32")


def _gram_step(R: torch.Tensor, Q: torch.Tensor | None, a: float, b: float, c: float,
               update_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on (R, Q) (Q None: a segment's first step). Each line one fused op, computed
    in fp32 (fp64) with fp32 coefficients and rounded once."""
    Z = gram_polynomial(R, b, c)
    if Q is None:
        Q = Z.clone()
        Q.diagonal(dim1=-2, dim2=-1).add_(a)  # a·I + Z: the scalar add runs in fp32 (opmath)
    else:
        # planted-bug target (parity_tests/mutants.py)
        Q = torch.baddbmm(Q, Q, Z, beta=a, alpha=1.0)
    if update_r:
        RZ = torch.baddbmm(R, R, Z, beta=a, alpha=1.0)
        R = torch.baddbmm(RZ, Z, RZ, beta=a, alpha=1.0)
    return R, Q


def gram_newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coeffs: Coeffs | Sequence[Coeffs] = POLAR_EXPRESS_COEFFS,
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    norm_scale: float = POLAR_EXPRESS_NORM_SCALE,
    restart_after: Sequence[int] = RESTART_AFTER,
    check_finite: bool = True,
) -> torch.Tensor:
    """Approximate polar factor of each (rows, cols) matrix in G by Gram Newton-Schulz.

    Arguments as newton_schulz (coeffs with the same schedule rules; X₀ = G/(norm_scale·‖G‖_F +
    eps)), plus `restart_after`: restart after that many steps (integers >= 1; entries >= steps
    have no effect, so the default (2,) serves every step count; () for none). The defaults
    (Polar Express schedule, 1.01 norm scale) make it a drop-in for polar_express, equal to it
    in exact arithmetic. Square matrices run newton_schulz (bitwise equal to it). Rectangular
    ones computed in bf16 run in float16 instead (the authors' precision; bf16 diverges, see
    below); in float16 a segment whose Q could overflow is refused. Errors: those of
    newton_schulz, ValueError for a bad restart_after or a float16 overflow risk.
    """
    _check_matrix_input(G, check_finite, compute_dtype)
    schedule = coefficient_schedule(coeffs, steps)
    restarts = check_restarts(restart_after)
    if G.shape[-2] == G.shape[-1]:
        return newton_schulz(G, steps, coeffs, eps, compute_dtype, norm_scale, check_finite=False)
    if compute_dtype == torch.bfloat16:
        # The authors compute in fp16, and bf16 is not enough: its 8-bit significand lets R's
        # roundings push eigenvalues past the interval the schedule was fitted on, and the
        # iteration diverges (measured: relative error 300 on 8×64 inputs with σ ∈ [0.1, 1];
        # in fp16 0.03, NS in bf16 0.035).
        compute_dtype = torch.float16
    if compute_dtype == torch.float16:
        check_fp16_range(schedule, restarts)

    X = normalized_wide(G, norm_scale, eps, compute_dtype)
    R, Q = torch.bmm(X, X.mT), None
    for k, (a, b, c) in enumerate(schedule):  # k = steps already done
        if k in restarts:
            X = torch.bmm(Q, X)
            R, Q = torch.bmm(X, X.mT), None
        segment_ends = k + 1 == len(schedule) or k + 1 in restarts
        R, Q = _gram_step(R, Q, a, b, c, update_r=not segment_ends)
    return from_wide(torch.bmm(Q, X), G)
