"""Gram Newton-Schulz: Newton-Schulz iterated on the small Gram matrix (.specs/orthogonalizers.md §3).

Zhang, Amsel, Chen, Dao 2026 (https://github.com/Dao-AILab/gram-newton-schulz,
https://dao-ailab.github.io/blog/2026/gram-newton-schulz/). For a wide X (s × l, s ≤ l) every NS
step is X ← P_k X with P_k = a_k I + b_k R + c_k R², R = X Xᵀ (s × s). The product of the P_k is a
polynomial in R₀ = X₀X₀ᵀ, so the whole run can be carried on s × s matrices:

    R ← X₀X₀ᵀ,  Q ← (unset)
    step k (1-based), triple (a, b, c):
        Z = b R + c R²
        Q = Z + a I                    first step of a segment
        Q = a Q + Q Z   (= Q P_k)      otherwise
        R = a RZ + Z RZ, RZ = a R + R Z   (= P_k R P_k)   unless k is the last step or a restart follows
    restart after step j (j in restart_after):  X ← Q X,  R ← X Xᵀ,  Q unset
    end:  X ← Q X

In exact arithmetic X_k = Q_k X₀ and R_k = X_k X_kᵀ, so the result is newton_schulz's with the same
schedule and normalisation; it touches the s × l matrix only at the start, at restarts and at the
end. Restarts (the authors' default: after step 2) re-form R from X: rounding errors make small
eigenvalues of R negative, which later polynomials amplify. Square inputs fall back to
newton_schulz, as the authors do (no saving when s = l).

Public names: RESTART_AFTER, check_restarts, gram_newton_schulz.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

from jax_reference.orthogonalizers.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    Coeffs,
    _matmul,
    _normalize,
    checked_input,
    coefficient_schedule,
    newton_schulz,
)

RESTART_AFTER: tuple[int, ...] = (2,)  # GramNewtonSchulz's default gram_newton_schulz_reset_iterations=[2]


def check_restarts(restart_after) -> frozenset[int]:
    """The restart positions as a set; ValueError unless a sequence of integers >= 1."""
    try:
        items = tuple(restart_after)
    except TypeError:
        items = None
    if items is None or not all(isinstance(j, numbers.Integral) and not isinstance(j, bool) and j >= 1 for j in items):
        raise ValueError(
            f"restart_after must be a sequence of integers >= 1 (restart after that many steps; "
            f"e.g. (2,), or () for none), got {restart_after!r}"
        )
    return frozenset(int(j) for j in items)


FP16_Q_LIMIT = 2.0**14  # a quarter of float16's largest finite value (65504)


def check_fp16_range(schedule, restarts) -> None:
    """ValueError if Q may overflow float16. On a null direction of R, Q's eigenvalue is the product of
    the segment's a_k (Polar Express with the restart after step 2: 33, then 30); a restart resets it."""
    product, first = 1.0, 1
    for k, (a, _, _) in enumerate(schedule):
        if k in restarts:
            product, first = 1.0, k + 1
        product *= abs(a)
        if product > FP16_Q_LIMIT:
            raise ValueError(
                f"gram_newton_schulz in float16 would overflow: steps {first}..{k + 1} run without a restart "
                f"and scale Q by up to {product:.3g}; restart within them (restart_after) or use float32"
            )


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


@jax.jit
def _gram(X):
    """R = rnd(X Xᵀ)."""
    return _matmul(X, jnp.swapaxes(X, -1, -2), _acc(X.dtype)).astype(X.dtype)


@jax.jit
def _apply(Q, X):
    """X = rnd(Q X)."""
    return _matmul(Q, X, _acc(X.dtype)).astype(X.dtype)


@functools.partial(jax.jit, static_argnames=("first", "update_r"))
def _gram_step(R, Q, abc, first, update_r):
    """One step on (R, Q); abc in the accumulation dtype. Q is ignored when `first`."""
    a, b, c = abc[0], abc[1], abc[2]
    acc, dt = abc.dtype, R.dtype
    Z = (b * R.astype(acc) + c * _matmul(R, R, acc)).astype(dt)
    if first:
        Q = (a * jnp.eye(R.shape[-1], dtype=acc) + Z.astype(acc)).astype(dt)
    else:
        Q = (a * Q.astype(acc) + _matmul(Q, Z, acc)).astype(dt)
    if update_r:
        RZ = (a * R.astype(acc) + _matmul(R, Z, acc)).astype(dt)
        R = (a * RZ.astype(acc) + _matmul(Z, RZ, acc)).astype(dt)
    return R, Q


def gram_newton_schulz(
    G,
    steps: int = 5,
    coeffs: Coeffs = POLAR_EXPRESS_COEFFS,
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    norm_scale: float = POLAR_EXPRESS_NORM_SCALE,
    restart_after=RESTART_AFTER,
) -> jax.Array:
    """Approximate polar factor of each (rows, cols) matrix in G by Gram Newton-Schulz.

    Args: as newton_schulz (G, steps, coeffs with the same schedule rules, eps, compute_dtype,
      norm_scale: X₀ = G/(norm_scale·‖G‖_F + eps)), plus
      restart_after: restart after that many steps (each an integer >= 1; entries >= steps have
        no effect, so the default (2,) serves every step count; () for no restart).
    The defaults (Polar Express schedule, 1.01 norm scale) make it a drop-in for polar_express:
    equal in exact arithmetic.

    Precision model (as newton_schulz: fp32 coefficients and accumulation, float64 for float64
    compute, one rounding to compute_dtype per fused op): R = rnd(X Xᵀ), Z = rnd(b R + c R R),
    Q = rnd(a I + Z) or rnd(a Q + Q Z), RZ = rnd(a R + R Z), R = rnd(a RZ + Z RZ), X = rnd(Q X).

    Square matrices (rows == cols) run newton_schulz itself (bitwise equal to it). Errors: those
    of newton_schulz, and ValueError for a bad restart_after.
    """
    G, compute_dtype, acc = checked_input(G, compute_dtype)
    schedule = coefficient_schedule(coeffs, steps)
    restarts = check_restarts(restart_after)
    if G.shape[-2] == G.shape[-1]:
        return newton_schulz(G, steps, coeffs, eps=eps, compute_dtype=compute_dtype, norm_scale=norm_scale)
    if compute_dtype == jnp.bfloat16:
        # As the authors: 16-bit Gram NS runs in float16. bf16's 8-bit significand lets R's roundings
        # push eigenvalues past the schedule's fitted interval and the run diverges (measured: relative
        # error 3.5 on 8×64 inputs with σ ∈ [0.1, 1]; float16 0.03).
        compute_dtype = jnp.dtype(jnp.float16)
    if compute_dtype == jnp.float16:
        check_fp16_range(schedule, restarts)

    X = _normalize(G, norm_scale, eps, compute_dtype)  # wide: rows ≤ cols
    R, Q = _gram(X), None
    for k, abc in enumerate(schedule):  # k = steps already done
        if k in restarts:
            X = _apply(Q, X)
            R, Q = _gram(X), None
        last_of_segment = k + 1 == len(schedule) or k + 1 in restarts
        R, Q = _gram_step(R, R if Q is None else Q, jnp.asarray(abc, acc), first=Q is None,
                          update_r=not last_of_segment)
    X = _apply(Q, X)
    if G.shape[-2] > G.shape[-1]:
        X = jnp.swapaxes(X, -1, -2)
    return X.astype(G.dtype)
