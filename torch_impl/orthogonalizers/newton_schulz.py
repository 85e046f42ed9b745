"""Orthogonalizers for Muon: Newton-Schulz quintic iterations and Polar Express.

Muon replaces an update matrix G = U Σ Vᵀ by (approximately) its polar factor U Vᵀ.
Both methods compute it with matrix polynomials only (no SVD): normalise
X₀ = G / (‖G‖_F·s + eps) so every singular value lies in (0, 1], then iterate

    A = X Xᵀ,   B = b·A + c·A²,   X ← a·X + B·X

which maps each singular value σ of X through p(σ) = aσ + bσ³ + cσ⁵ and leaves U
and V untouched. Five steps of Keller Jordan's quintic (a, b, c) = (3.4445, -4.7750,
2.0315) push σ into roughly [0.7, 1.2] (https://kellerjordan.github.io/posts/muon/);
Polar Express (Amsel et al. 2025, https://arxiv.org/abs/2505.16932) uses a different,
minimax-optimal (a, b, c) per step for a tighter band in the same number of matmuls.

Because the iteration only acts on singular values, `polynomial_oracle` can compute
what infinite-precision NS would return with an fp64 SVD: it is the exact reference
the parity tests compare against.

Layout: torch's (rows, cols) = (out_features, in_features). Any (..., m, n) batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Coeffs = tuple[float, float, float]

NS5_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)

# 5-step Polar Express schedule as used by nanochat / modded-nanogpt (safety factor 2e-2,
# cushion 2). Steps past the fifth reuse the last triple.
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The schedule is optimal on σ ∈ (0, 1]; dividing by 1.01·‖X‖_F keeps bf16 rounding of the
# norm from pushing the top singular value past 1 (nanochat's choice).
POLAR_EXPRESS_NORM_SCALE = 1.01


def coefficient_schedule(coeffs: Coeffs | Sequence[Coeffs], steps: int) -> list[Coeffs]:
    """Expand one (a, b, c) or a per-step sequence of them to exactly `steps` triples.

    A sequence shorter than `steps` repeats its last triple (Polar Express convention: the
    schedule converges to a fixed polynomial)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    seq = list(coeffs)
    if len(seq) == 3 and all(isinstance(c, (int, float)) for c in seq):
        seq = [tuple(seq)]
    if not seq:
        raise ValueError("coeffs is empty: give one (a, b, c) triple or a sequence of them")
    triples = []
    for i, t in enumerate(seq):
        t = tuple(t) if isinstance(t, Sequence) else (t,)
        if len(t) != 3 or not all(isinstance(c, (int, float)) for c in t):
            raise ValueError(f"coefficient triple {i} must be 3 numbers (a, b, c), got {t!r}")
        triples.append(tuple(float(c) for c in t))
    return [triples[min(k, len(triples) - 1)] for k in range(steps)]


def _check_matrix_input(G: torch.Tensor, check_finite: bool, compute_dtype: torch.dtype | None = None) -> None:
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
    if not isinstance(G, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(G).__name__}")
    if not G.is_floating_point():
        raise ValueError(f"orthogonalization needs a floating-point tensor, got dtype {G.dtype}")
    if G.ndim < 2:
        raise ValueError(f"orthogonalization needs a (..., rows, cols) tensor, got shape {tuple(G.shape)}")
    if G.shape[-1] == 0 or G.shape[-2] == 0:
        raise ValueError(f"cannot orthogonalize an empty matrix of shape {tuple(G.shape)}")
    if check_finite and not bool(torch.isfinite(G).all()):
        raise ValueError("input contains NaN or inf; orthogonalization would return NaN everywhere")


def frobenius_norm(X: torch.Tensor) -> torch.Tensor:
    """Per-matrix ‖X‖_F over the last two dims, keepdim, accurate on large CPU tensors.

    torch's fp32 `vector_norm` loses ~4e-5 relative accuracy at a few million elements on CPU
    (pytorch issue 169237); a plain sum of squares stays at ~1e-8."""
    return X.square().sum(dim=(-2, -1), keepdim=True).sqrt()


def wide(G: torch.Tensor) -> torch.Tensor:
    """G as a (batch, s, l) stack in the wide orientation, s = min(rows, cols) ≤ l: tall
    matrices are transposed, so every Gram matrix X Xᵀ is the small s × s side."""
    m, n = G.shape[-2:]
    X = G.reshape(-1, m, n)
    return X.mT if m > n else X


def from_wide(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Undo `wide`: X (batch, s, l) back to G's shape and dtype."""
    *batch, m, n = G.shape
    # planted-bug target (parity_tests/mutants.py)
    if m > n:
        X = X.mT
    return X.reshape(*batch, m, n).to(G.dtype)


def normalized_wide(G: torch.Tensor, norm_scale: float, eps: float, compute_dtype: torch.dtype) -> torch.Tensor:
    """X₀ = wide(G) / (‖G‖_F·norm_scale + eps) per matrix, computed in fp32 (fp64 for fp64 input)
    and rounded once to `compute_dtype`: every singular value of X₀ lies in [0, 1/norm_scale]."""
    norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    X = wide(G).to(norm_dtype)
    # planted-bug target (parity_tests/mutants.py)
    return (X / (frobenius_norm(X) * norm_scale + eps)).to(compute_dtype)


def gram_polynomial(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """B = b·A + c·A² for symmetric A, computed in fp32 and rounded once."""
    if c == 0:
        # torch 2.13 CPU: bf16 baddbmm with alpha=0 returns its input unscaled (beta ignored)
        # once the matrix is 17 × 17 or larger; b·A is the same math and rounding.
        return A * b
    # A is symmetric, so A·Aᵀ = A·A in exact arithmetic. The transposed operand layout takes
    # oneDNN's fast bf16 path on CPUs without native bf16 GEMM (measured 3.4–7.9× faster on an
    # AVX2 CPU) and costs nothing in fp32 or on CUDA.
    # planted-bug target (parity_tests/mutants.py)
    return torch.baddbmm(A, A, A.mT, beta=b, alpha=c)


def ns_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One step on a wide (batch, s, l) stack: A = X Xᵀ, B = b·A + c·A², X ← a·X + B·X,
    i.e. σ ↦ aσ + bσ³ + cσ⁵. Two fused ops, each computed in fp32 and rounded once."""
    A = torch.bmm(X, X.mT)
    B = gram_polynomial(A, b, c)
    return torch.baddbmm(X, B.mT, X, beta=a, alpha=1.0)  # B symmetric: Bᵀ·X = B·X, the fast layout


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coeffs: Coeffs | Sequence[Coeffs] = NS5_COEFFS,
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    norm_scale: float = 1.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Approximate the polar factor of each matrix in G (see the module docstring).

    The norm is taken in fp32 (fp64 for fp64 input) before casting to `compute_dtype`; the
    iteration runs on the wide orientation (rows ≤ cols) so A = X Xᵀ is the small Gram
    matrix. Coefficients stay Python floats: the fused baddbmm applies them in fp32 to the
    fp32-accumulated products and rounds once per op. Returns G's dtype; G is not modified.
    `check_finite=False` skips the NaN/inf check (a host sync on GPU) for callers that
    already checked, such as Muon."""
    _check_matrix_input(G, check_finite, compute_dtype)
    schedule = coefficient_schedule(coeffs, steps)
    X = normalized_wide(G, norm_scale, eps, compute_dtype)
    for a, b, c in schedule:
        X = ns_step(X, a, b, c)
    return from_wide(X, G)


def polar_express(
    G: torch.Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    check_finite: bool = True,
) -> torch.Tensor:
    """Polar Express: `newton_schulz` with the per-step minimax schedule and 1.01 norm scale."""
    return newton_schulz(G, steps, POLAR_EXPRESS_COEFFS, eps, compute_dtype,
                         POLAR_EXPRESS_NORM_SCALE, check_finite)


def exact_polar(G: torch.Tensor) -> torch.Tensor:
    """U Vᵀ from an fp64 thin SVD: the exact polar factor NS approximates. Returns float64."""
    _check_matrix_input(G, check_finite=True)
    U, _, Vh = torch.linalg.svd(G.detach().to(torch.float64), full_matrices=False)
    return U @ Vh


def polynomial_oracle(
    G: torch.Tensor,
    coeffs: Coeffs | Sequence[Coeffs],
    steps: int,
    eps: float = 1e-7,
    norm_scale: float = 1.0,
) -> torch.Tensor:
    """Exact fp64 result of `steps` NS iterations: map σ/(‖G‖_F·s + eps) through the
    per-step scalar polynomials and rebuild U diag(p(σ)) Vᵀ. Returns float64."""
    _check_matrix_input(G, check_finite=True)
    schedule = coefficient_schedule(coeffs, steps)
    G64 = G.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    s = S / (frobenius_norm(G64).squeeze(-1) * norm_scale + eps)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return (U * s.unsqueeze(-2)) @ Vh
