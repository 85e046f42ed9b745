"""MuonEq and Muon+: maps around an orthogonalizer (.specs/orthogonalizers.md §6), each off by
default. MuonEq balances the rows of the input before it; Muon+ restores the Frobenius norm of an
exactly semi-orthogonal matrix after it. `balanced` composes them with any orthogonalizer."""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Floors of the row norms (MuonEq) and of ‖O‖_F (Muon+), as nanochat's clamp_min(1e-6).
ROW_EQUILIBRATION_EPS = 1e-6
FROBENIUS_RENORMALIZATION_EPS = 1e-6


def _frobenius(X) -> jax.Array:
    return jnp.sqrt(jnp.sum(X * X, axis=(-2, -1), keepdims=True))


def row_equilibrate(X: jax.Array) -> jax.Array:
    """MuonEq (R): each row of a float32 (rows, cols) matrix rescaled to the quadratic-mean row norm.

    X_i ← X_i · t / max(‖X_i‖₂, 1e-6) with t = ‖X‖_F / √rows (rows of the §2 view, whether the
    matrix is wide or tall). Rows with norm ≥ 1e-6 all end with norm t, so ‖X‖_F is kept when no
    row is below the floor.
    """
    target = _frobenius(X) / math.sqrt(X.shape[-2])
    row_norm = jnp.maximum(jnp.sqrt(jnp.sum(X * X, axis=-1, keepdims=True)), ROW_EQUILIBRATION_EPS)
    return X * (target / row_norm)


def frobenius_renormalize(O: jax.Array) -> jax.Array:
    """Muon+ as nanochat: O · √min(rows, cols) / max(‖O‖_F, 1e-6), so ‖O‖_F = √min(rows, cols)."""
    return O * (math.sqrt(min(O.shape[-2:])) / jnp.maximum(_frobenius(O), FROBENIUS_RENORMALIZATION_EPS))


def balanced(
    orthogonalize: Callable[[jax.Array], jax.Array], row_equilibration: bool, frobenius_renormalization: bool
) -> Callable[[jax.Array], jax.Array]:
    """orth of §4 with the options: X ↦ renorm(orth(equilibrate(X))), each step only when asked.

    With both off it returns `orthogonalize` itself (Muon unchanged). The maps act on one whole
    float32 (rows, cols) matrix, so they run wherever orth runs (on the owner in the sharded step).
    """
    if not (row_equilibration or frobenius_renormalization):
        return orthogonalize

    def orth(X):
        if row_equilibration:
            X = row_equilibrate(X)
        O = orthogonalize(X).astype(jnp.float32)
        return frobenius_renormalize(O) if frobenius_renormalization else O

    return orth
