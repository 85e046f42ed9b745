"""Test inputs drawn by hypothesis as (shape, seed, kind) and built with numpy.

Drawing a seed rather than array contents keeps examples cheap, shrinkable and free of
hypothesis' rank-deficient default fills; a few shape buckets bound jax.jit recompiles.
Every framework gets its own copy of the same numpy array."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

DIMS = (8, 24, 64)              # small enough for fp64 SVD oracles in every example
BATCHES = ((), (3,), (2, 2))
CONDITIONING = ("gaussian", "spectrum", "low_rank")


@st.composite
def matrix_specs(draw, dims=DIMS, batches=BATCHES, conditioning=CONDITIONING):
    return dict(batch=draw(st.sampled_from(batches)), m=draw(st.sampled_from(dims)),
                n=draw(st.sampled_from(dims)), seed=draw(st.integers(0, 2**31 - 1)),
                kind=draw(st.sampled_from(conditioning)),
                scale=draw(st.sampled_from((1e-3, 1.0, 1e3))))


def build_matrix(spec: dict, s_min: float = 1e-3) -> np.ndarray:
    """float32 array of shape batch + (m, n).

    gaussian: iid normal; spectrum: U·diag(s)·Vᵀ with s log-uniform in [s_min, 1] (controlled
    conditioning); low_rank: rank ⌈min(m,n)/3⌉ (zero singular values must stay zero)."""
    rng = np.random.default_rng(spec["seed"])
    shape, m, n = spec["batch"], spec["m"], spec["n"]
    k = min(m, n)
    if spec["kind"] == "gaussian":
        X = rng.standard_normal(shape + (m, n))
    elif spec["kind"] == "spectrum":
        U, _ = np.linalg.qr(rng.standard_normal(shape + (m, k)))
        V, _ = np.linalg.qr(rng.standard_normal(shape + (n, k)))
        s = np.exp(rng.uniform(np.log(s_min), 0.0, size=shape + (k,)))
        X = (U * s[..., None, :]) @ np.swapaxes(V, -1, -2)
    else:
        r = max(1, -(-k // 3))
        X = rng.standard_normal(shape + (m, r)) @ rng.standard_normal(shape + (r, n))
    return (X * spec.get("scale", 1.0)).astype(np.float32)


def rel_fro(a, b) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
