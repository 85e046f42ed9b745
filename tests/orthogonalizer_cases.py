"""Inputs and helpers shared by tests/jax_reference and tests/torch_impl (test_schedules,
test_gram_newton_schulz, test_aol, test_quality, test_muon_variants). numpy and Hypothesis only:
no framework is imported here, so each side's tests load without the other's."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

# A few shape buckets: every new shape recompiles JAX's jitted steps (../shared/NOTES.md).
DIMS = st.sampled_from([8, 16, 32, 48])
SEEDS = st.integers(0, 2**32 - 1)
# Two buckets (wide, tall, square) for the algorithms with their own jitted pieces (AOL, Gram NS,
# cubic): a new shape costs 0.3–1 s of compiles on 2 cores; 8 and 32 are shapes newton_schulz's own
# tests compile anyway.
FEW_DIMS = st.sampled_from([8, 32])
KINDS = st.sampled_from(["gaussian", "rank_deficient", "ill_conditioned"])


def examples(fraction=1.0):
    """The active Hypothesis profile's example count (conftest.py), scaled down for costly tests."""
    return settings(max_examples=max(3, round(settings().max_examples * fraction)), deadline=None)


def matrix(kind, seed, m, n, dtype=np.float32):
    """A test input of shape (m, n): "gaussian"; "rank_deficient" (rank min(m, n)//3, at least 1);
    "ill_conditioned" (singular values 10^0 … 10^-6); "well_conditioned" (uniform in [0.1, 1])."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    if kind == "gaussian":
        return rng.standard_normal((m, n)).astype(dtype)
    if kind == "rank_deficient":
        r = max(1, k // 3)
        return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n))).astype(dtype)
    if kind not in ("ill_conditioned", "well_conditioned"):
        raise ValueError(f"unknown kind {kind!r}")
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    spectrum = np.logspace(0, -6, k) if kind == "ill_conditioned" else rng.uniform(0.1, 1.0, k)
    return ((U * spectrum) @ V.T).astype(dtype)


def rel_err(x, ref):
    """Relative Frobenius error of x against ref, in float64."""
    x = np.asarray(x).astype(np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def bf16_rounded(G):
    """G rounded to bf16 and back to float32: the input a bf16 run actually sees.

    Round to nearest, ties to even, on the float32 bit pattern: keep the top 16 bits after adding
    0x7FFF plus the lowest kept bit (what torch's and ml_dtypes' casts do). Overflow rounds to ±inf
    by the same carry. NaN stays NaN (as the quiet NaN 0x7FC0; casts differ in the payload: torch's
    vectorised CPU cast gives 0xFFFF), so compare NaN-ness, not bits, there."""
    bits = np.asarray(G, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16) << 16  # wraps only for NaN bits
    rounded = np.where(np.isnan(bits.view(np.float32)), np.uint32(0x7FC00000), rounded).astype(np.uint32)
    return rounded.view(np.float32)


def nanochat_row_equilibrate(X):
    """nanochat's MuonEq in numpy fp64: target = ‖X‖_F/√rows, row norms floored at 1e-6."""
    target = np.linalg.norm(X) / np.sqrt(X.shape[0])
    return X * (target / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6))


def muon_plus(O):
    """Muon+ in numpy fp64: O·√min(rows, cols)/max(‖O‖_F, 1e-6)."""
    return O * np.sqrt(min(O.shape)) / max(np.linalg.norm(O), 1e-6)


def identity(X, steps, eps, compute_dtype):
    """An orthogonalizer that returns its input: isolates what Muon does around orth."""
    return X
