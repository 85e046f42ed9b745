"""Polynomial orthogonalization of matrices, and fp64 oracles for it.

Muon replaces a momentum matrix G = U Σ Vᵀ by (approximately) its polar factor
U Vᵀ. Instead of an SVD it runs a few odd matrix polynomials on the normalized
input (https://kellerjordan.github.io/posts/muon/):

    X_0     = G / (‖G‖_F · norm_scale + eps)          (all σ now in [0, 1])
    A       = X_k X_kᵀ
    B       = b_k A + c_k A²
    X_{k+1} = a_k X_k + B X_k  =  U p_k(Σ) Vᵀ,   p_k(s) = a_k s + b_k s³ + c_k s⁵

so every step maps each singular value s ↦ p_k(s) and leaves U, V alone.
Keller Jordan's quintic uses one triple at every step; Polar Express (Amsel et
al. 2025, https://arxiv.org/abs/2505.16932) uses a different, minimax-optimal
triple per step and divides by 1.01·‖G‖_F so that the top singular value stays
inside the interval the polynomials were fitted on.

Layout follows torch: matrices are (rows, cols) in the last two axes, leading
axes are a batch. Tall matrices are processed transposed so that the Gram
matrix A is the small side.

This is the orth of .specs/muon_math.md §4, which treats it as a black box.

Public names: NS5_COEFFS, POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_NORM_SCALE,
coefficient_schedule, newton_schulz, polar_express, exact_polar,
polynomial_oracle.
"""

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Triple = tuple[float, float, float]

# Keller Jordan's quintic: not convergent, it pushes every σ into roughly
# [0.7, 1.2] in 5 steps, which is what Muon needs.
NS5_COEFFS: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express, 5 steps, safety_factor=2e-2, cushion=2 (as in nanochat and
# modded-nanogpt).
POLAR_EXPRESS_COEFFS: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_SCALE = 1.01

Coeffs = Triple | Sequence[Triple]


def _check_matrix(dtype, shape, values=None) -> None:
    """Raises ValueError for inputs no orthogonalizer can make sense of.

    `values` is checked for NaN/inf only when given (i.e. concrete).
    """
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"expected a floating-point matrix, got dtype {dtype}")
    if len(shape) < 2:
        raise ValueError(f"expected a (..., rows, cols) array with ndim >= 2, got shape {tuple(shape)}")
    if shape[-2] == 0 or shape[-1] == 0:
        raise ValueError(f"cannot orthogonalize an empty matrix, got shape {tuple(shape)}")
    if values is not None and not np.all(np.isfinite(np.asarray(values))):
        raise ValueError(f"input of shape {tuple(shape)} contains NaN or inf")


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_triple(t) -> Triple:
    try:
        ok = len(t) == 3 and all(isinstance(x, numbers.Real) for x in t)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"a coefficient triple must be 3 real numbers (a, b, c), got {t!r}")
    return tuple(float(x) for x in t)


def coefficient_schedule(coeffs: Coeffs, steps: int) -> list[Triple]:
    """One (a, b, c) per step; a single triple repeats, a list's last triple repeats."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    try:
        n = len(coeffs)
    except TypeError:
        raise ValueError(f"coeffs must be one (a, b, c) triple or a sequence of triples, got {coeffs!r}") from None
    if n == 0:
        raise ValueError("coeffs is an empty sequence")
    if all(isinstance(x, numbers.Real) for x in coeffs):
        triples = [_as_triple(coeffs)]
    else:
        triples = [_as_triple(t) for t in coeffs]
    return [triples[min(k, len(triples) - 1)] for k in range(steps)]


def checked_input(G, compute_dtype) -> tuple[jax.Array, np.dtype, type]:
    """(G as an array, compute_dtype, accumulation dtype) after the input checks every
    orthogonalizer shares (_check_matrix; NaN/inf only for a concrete G). float64 compute
    accumulates in float64, everything else in float32."""
    G = jnp.asarray(G)
    _check_matrix(G.dtype, G.shape, None if _is_traced(G) else G)
    compute_dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(compute_dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be floating, got {compute_dtype}")
    return G, compute_dtype, (jnp.float64 if compute_dtype == jnp.float64 else jnp.float32)


def _matmul(x, y, acc_dtype):
    # HIGHEST: on GPU XLA would otherwise use TF32 for f32 inputs.
    # preferred_element_type: bf16 products accumulate in acc_dtype, like cuBLAS.
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc_dtype)


# The two jitted pieces below take coefficients, eps and the norm scale as
# traced values, so one compile per (shape, dtype) serves every schedule and
# step count when newton_schulz is called eagerly.


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _normalize(G, norm_scale, eps, compute_dtype):
    norm_dtype = jnp.float64 if G.dtype == jnp.float64 else jnp.float32
    G = G.astype(norm_dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(G), axis=(-2, -1), keepdims=True))
    X = (G / (norm * norm_scale + eps)).astype(compute_dtype)
    # Tall inputs are iterated transposed, so that A = X Xᵀ is the small side.
    return jnp.swapaxes(X, -1, -2) if G.shape[-2] > G.shape[-1] else X


@jax.jit
def _step(X, abc):
    """One fused step; abc holds (a, b, c) in the accumulation dtype."""
    a, b, c = abc[0], abc[1], abc[2]
    acc = abc.dtype
    A = _matmul(X, jnp.swapaxes(X, -1, -2), acc).astype(X.dtype)
    B = (b * A.astype(acc) + c * _matmul(A, A, acc)).astype(X.dtype)
    return (a * X.astype(acc) + _matmul(B, X, acc)).astype(X.dtype)


def newton_schulz(
    G,
    steps: int = 5,
    coeffs: Coeffs = NS5_COEFFS,
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    norm_scale: float = 1.0,
) -> jax.Array:
    """Approximate polar factor of each (rows, cols) matrix in G (..., m, n).

    Args:
      G: floating array, ndim >= 2; leading axes are a batch.
      steps: number of polynomial steps (>= 1).
      coeffs: one (a, b, c) triple used at every step, or a sequence of
        triples where step k uses triple k; when steps exceeds the sequence's
        length the last triple repeats, when it is shorter only the first
        `steps` triples are used.
      eps: added to the scaled Frobenius norm so a zero matrix maps to zero.
      compute_dtype: dtype of X, A and B between the fused ops (bf16 by
        default; float32 or float64 for oracles, float64 needs
        `jax.enable_x64(True)`).
      norm_scale: X_0 = G / (‖G‖_F · norm_scale + eps), norm per matrix.

    Returns:
      Array of G's shape and dtype.

    Precision model (deliberately mirrors the fused torch kernels):
      * ‖G‖_F and the division are done in float32 (float64 for float64 input)
        before the single cast to compute_dtype.
      * Coefficients are float32 (float64 when compute_dtype is float64), NOT
        compute_dtype: with weak typing JAX would round a Python 3.4445 to the
        bf16 value 3.4375, whereas torch's addmm/baddbmm(beta=b, alpha=c) on
        bf16 tensors runs cuBLAS with fp32 alpha/beta and fp32 accumulation.
        So each fused op computes in float32 and rounds to compute_dtype once:
          A = rnd(X Xᵀ),  B = rnd(b·A + c·A A),  X = rnd(a·X + B X).
      * Matmuls use Precision.HIGHEST (no TF32 on GPU).

    Errors: ValueError for a non-floating dtype, ndim < 2, an empty matrix,
    steps < 1 or a malformed coefficient triple, and for NaN/inf in G when G is
    concrete. Under jit G is a tracer and is not checked: a non-finite input
    then simply propagates NaN into the output.
    """
    G, compute_dtype, acc = checked_input(G, compute_dtype)
    schedule = coefficient_schedule(coeffs, steps)

    X = _normalize(G, norm_scale, eps, compute_dtype)
    for abc in schedule:
        X = _step(X, jnp.asarray(abc, acc))
    if G.shape[-2] > G.shape[-1]:
        X = jnp.swapaxes(X, -1, -2)
    return X.astype(G.dtype)


def polar_express(G, steps: int = 5, eps: float = 1e-7, compute_dtype=jnp.bfloat16) -> jax.Array:
    """newton_schulz with the Polar Express schedule and its 1.01 norm cushion."""
    return newton_schulz(
        G,
        steps=steps,
        coeffs=POLAR_EXPRESS_COEFFS,
        eps=eps,
        compute_dtype=compute_dtype,
        norm_scale=POLAR_EXPRESS_NORM_SCALE,
    )


def _fp64_svd(G):
    G = G if isinstance(G, np.ndarray) else np.asarray(G)
    _check_matrix(G.dtype, G.shape, G)
    G = G.astype(np.float64)
    U, S, Vh = np.linalg.svd(G, full_matrices=False)
    return G, U, S, Vh


def exact_polar(G) -> np.ndarray:
    """U Vᵀ of the thin fp64 SVD of each matrix in G; returns numpy float64.

    This is the fp64 oracle for what the iterations approximate, so it always
    returns float64 numpy whatever G's dtype. Same input errors as
    newton_schulz (G must be concrete).
    """
    _, U, _, Vh = _fp64_svd(G)
    return U @ Vh


def polynomial_oracle(G, coeffs: Coeffs, steps: int, eps: float = 1e-7, norm_scale: float = 1.0) -> np.ndarray:
    """What newton_schulz computes in exact arithmetic; returns numpy float64.

    G = U Σ Vᵀ (thin fp64 SVD), s = σ / (‖G‖_F · norm_scale + eps), then each
    step applies s ← a s + b s³ + c s⁵ with that step's triple (same schedule
    rules as newton_schulz), and the result is U diag(s) Vᵀ.
    """
    schedule = coefficient_schedule(coeffs, steps)
    G, U, S, Vh = _fp64_svd(G)
    norm = np.sqrt(np.sum(np.square(G), axis=(-2, -1)))[..., None]
    s = S / (norm * norm_scale + eps)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return (U * s[..., None, :]) @ Vh
