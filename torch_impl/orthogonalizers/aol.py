"""AOL-preconditioned Newton-Schulz (Turbo-Muon), and its fp64 oracle (.specs/orthogonalizers.md §4).

Boissin, Massena, Mamalet, Serrurier, "Turbo-Muon: Accelerating Orthogonality-Based Optimization
with Pre-Conditioning", https://arxiv.org/abs/2512.04632; the rescaling is AOL (Prach & Lampert
2022, https://arxiv.org/abs/2208.03160). In the wide orientation (X is s × l, s ≤ l), A = X Xᵀ:

    d_i = 1 / sqrt(max(Σ_j |A_ij|, eps))          X₀ = diag(d) X     (each row of the wide X)

replaces the Frobenius normalisation and guarantees ‖X₀‖₂ ≤ 1: for any v,
vᵀ D A D v ≤ Σ_ij |A_ij|(d_i²v_i² + d_j²v_j²)/2 = Σ_i d_i² r_i v_i² ≤ ‖v‖². Since A₀ = D A D is
X₀X₀ᵀ, the first Newton-Schulz step reuses A (the rescaling costs one row sum, no matmul). The
schedule is You's 5 triples minus the first ones: `steps` steps run the last `steps` triples
(SCHEDULES["aol"], 1 ≤ steps ≤ 5, default 4: Turbo-Muon's 4 steps replace NS's 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torch_impl.orthogonalizers.newton_schulz import (
    Coeffs,
    _check_matrix_input,
    coefficient_schedule,
    from_wide,
    gram_polynomial,
    ns_step,
    wide,
)
from torch_impl.orthogonalizers.schedules import SCHEDULES


def _schedule(coeffs, steps) -> list[Coeffs]:
    return list(SCHEDULES["aol"].triples(steps)) if coeffs is None else coefficient_schedule(coeffs, steps)


def aol(
    G: torch.Tensor,
    steps: int = 4,
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    coeffs: Coeffs | Sequence[Coeffs] | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Turbo-Muon: AOL rescaling folded into the first Newton-Schulz step.

    steps: 1..5 with the Turbo-Muon schedule (ValueError naming the valid counts otherwise), any
    steps >= 1 with explicit `coeffs` (newton_schulz's rules). eps floors the row sums, so a zero
    matrix maps to zero. Precision model: X = rnd(G) (no normalisation), A = rnd(X Xᵀ),
    d = rsqrt(max(Σ_j |A_ij|, eps)) in fp32 (fp64) from the rounded A, X₀ = rnd(d_i X_ij),
    A₀ = rnd(d_i A_ij d_j), then X₁ = rnd(a X₀ + rnd(b A₀ + c A₀²) X₀) and ns_step for the rest.
    Same input errors as newton_schulz."""
    _check_matrix_input(G, check_finite, compute_dtype)
    schedule = _schedule(coeffs, steps)
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    X = wide(G).to(compute_dtype)
    A = torch.bmm(X, X.mT)
    d = A.to(acc).abs().sum(dim=-1).clamp_min(eps).rsqrt()
    X = (d.unsqueeze(-1) * X.to(acc)).to(compute_dtype)
    # planted-bug target (parity_tests/mutants.py)
    A = (d.unsqueeze(-1) * A.to(acc) * d.unsqueeze(-2)).to(compute_dtype)
    a, b, c = schedule[0]
    B = gram_polynomial(A, b, c)  # A₀ = X₀X₀ᵀ: the first step's Gram matrix, reused
    X = torch.baddbmm(X, B.mT, X, beta=a, alpha=1.0)
    for a, b, c in schedule[1:]:
        X = ns_step(X, a, b, c)
    return from_wide(X, G)


def aol_precondition(G: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """X₀ of AOL in float64, in G's own orientation: D G (rows ≤ cols) or G D (tall), with
    D = diag(1/sqrt(max(Σ_j |M_ij|, eps))) and M the small Gram matrix (G Gᵀ wide, Gᵀ G tall)."""
    _check_matrix_input(G, check_finite=True)
    W = wide(G.detach().to(torch.float64))
    d = (W @ W.mT).abs().sum(dim=-1).clamp_min(eps).rsqrt()
    return from_wide(d.unsqueeze(-1) * W, G.detach().to(torch.float64))


def aol_oracle(G: torch.Tensor, steps: int = 4, eps: float = 1e-7,
               coeffs: Coeffs | Sequence[Coeffs] | None = None) -> torch.Tensor:
    """What `aol` computes in exact arithmetic, float64: X₀ = aol_precondition(G) = U Σ Vᵀ, each
    step maps every singular value s ↦ a s + b s³ + c s⁵ (aol's schedule rules), result U p(Σ) Vᵀ."""
    schedule = _schedule(coeffs, steps)
    U, s, Vh = torch.linalg.svd(aol_precondition(G, eps), full_matrices=False)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return (U * s.unsqueeze(-2)) @ Vh
