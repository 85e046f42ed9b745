"""AOL-preconditioned Newton-Schulz (Turbo-Muon), and its fp64 oracle (.specs/orthogonalizers.md §4).

Boissin, Massena, Mamalet, Serrurier, "Turbo-Muon: Accelerating Orthogonality-Based Optimization
with Pre-Conditioning", https://arxiv.org/abs/2512.04632; the rescaling is AOL (Prach & Lampert
2022, https://arxiv.org/abs/2208.03160). In the wide orientation (X is s × l, s ≤ l; tall inputs
are transposed, as everywhere), with A = X Xᵀ:

    d_i = 1 / sqrt(max(Σ_j |A_ij|, eps))          X₀ = diag(d) X     (each ROW of the wide X rescaled)

replaces the Frobenius normalisation. Then ‖X₀‖₂ ≤ 1: for any v,
vᵀ D A D v ≤ Σ_ij |A_ij| (d_i²v_i² + d_j²v_j²)/2 = Σ_i d_i² r_i v_i² ≤ ‖v‖² (d_i² r_i = 1, or
r_i/eps < 1 where clamped). The first step reuses A: X₁ = a X₀ + (b A₀ + c A₀²) X₀ with
A₀ = D A D (no extra matmul: the AOL cost is one row sum). Then the remaining steps are plain NS.
Turbo-Muon's schedule is You's 5-step schedule without its first step: a run of `steps` steps uses
the last `steps` triples of YOU_COEFFS (SCHEDULES["aol"], 1 ≤ steps ≤ 5, default 4).

Public names: aol, aol_precondition, aol_oracle.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_reference.orthogonalizers.newton_schulz import (
    Coeffs,
    _check_matrix,
    _matmul,
    _step,
    checked_input,
    coefficient_schedule,
)
from jax_reference.orthogonalizers.schedules import SCHEDULES


def _schedule(coeffs, steps):
    return SCHEDULES["aol"].triples(steps) if coeffs is None else coefficient_schedule(coeffs, steps)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _aol_first_step(G, abc, eps, compute_dtype):
    """X = rnd(G) (G wide), A = rnd(X Xᵀ), d from A, then one NS step on (D X, D A D)."""
    a, b, c = abc[0], abc[1], abc[2]
    acc = abc.dtype
    X = G.astype(compute_dtype)
    A = _matmul(X, jnp.swapaxes(X, -1, -2), acc).astype(compute_dtype)
    d = jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(A.astype(acc)), axis=-1), eps))
    X = (d[..., :, None] * X.astype(acc)).astype(compute_dtype)
    A = (d[..., :, None] * A.astype(acc) * d[..., None, :]).astype(compute_dtype)
    B = (b * A.astype(acc) + c * _matmul(A, A, acc)).astype(compute_dtype)
    return (a * X.astype(acc) + _matmul(B, X, acc)).astype(compute_dtype)


def aol(G, steps: int = 4, eps: float = 1e-7, compute_dtype=jnp.bfloat16, coeffs: Coeffs | None = None) -> jax.Array:
    """Turbo-Muon: AOL rescaling folded into the first Newton-Schulz step.

    Args:
      G: floating array (..., rows, cols); leading axes are a batch.
      steps: 1 ≤ steps ≤ 5 with the Turbo-Muon schedule (the last `steps` triples of YOU_COEFFS;
        ValueError naming the valid counts otherwise); any steps >= 1 with explicit `coeffs`.
      eps: floor of the row sums Σ_j |A_ij| (a zero matrix maps to zero).
      compute_dtype: dtype of X and A between the fused ops (bf16 default).
      coeffs: None for the Turbo-Muon schedule, or a triple / sequence of triples with
        newton_schulz's rules (step k uses triple k, the last repeats).

    Precision model (fp32 coefficients and accumulation, float64 for float64 compute; one
    rounding to compute_dtype per fused op): X = rnd(G) with no normalisation, A = rnd(X Xᵀ),
    d = rsqrt(max(Σ_j |A_ij|, eps)) in fp32 from A, X = rnd(d_i X_ij), A = rnd(d_i A_ij d_j),
    then B = rnd(b A + c A A), X = rnd(a X + B X), and plain newton_schulz steps after.

    Same input errors as newton_schulz.
    """
    G, compute_dtype, acc = checked_input(G, compute_dtype)
    schedule = _schedule(coeffs, steps)
    tall = G.shape[-2] > G.shape[-1]
    # Transposed before the jitted step, so a tall matrix and its wide transpose share one compile.
    X = _aol_first_step(jnp.swapaxes(G, -1, -2) if tall else G, jnp.asarray(schedule[0], acc), eps, compute_dtype)
    for abc in schedule[1:]:
        X = _step(X, jnp.asarray(abc, acc))
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    return X.astype(G.dtype)


def aol_precondition(G, eps: float = 1e-7) -> np.ndarray:
    """X₀ of AOL in numpy float64, in G's own orientation: D G (rows ≤ cols) or G D (tall).

    D = diag(1/sqrt(max(Σ_j |M_ij|, eps))) with M the small Gram matrix (G Gᵀ wide, Gᵀ G tall).
    G must be concrete; same input errors as exact_polar.
    """
    G = G if isinstance(G, np.ndarray) else np.asarray(G)
    _check_matrix(G.dtype, G.shape, G)
    W = G.astype(np.float64)
    tall = W.shape[-2] > W.shape[-1]
    if tall:
        W = np.swapaxes(W, -1, -2)
    d = 1 / np.sqrt(np.maximum(np.abs(W @ np.swapaxes(W, -1, -2)).sum(axis=-1), eps))
    X0 = d[..., :, None] * W
    return np.swapaxes(X0, -1, -2) if tall else X0


def aol_oracle(G, steps: int = 4, eps: float = 1e-7, coeffs: Coeffs | None = None) -> np.ndarray:
    """What aol computes in exact arithmetic; numpy float64.

    X₀ = aol_precondition(G, eps) = U Σ Vᵀ (thin fp64 SVD); every step maps each singular value
    s ↦ a s + b s³ + c s⁵ (same schedule rules as aol); the result is U diag(s) Vᵀ.
    """
    schedule = _schedule(coeffs, steps)
    X0 = aol_precondition(G, eps)
    U, s, Vh = np.linalg.svd(X0, full_matrices=False)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return (U * s[..., None, :]) @ Vh
