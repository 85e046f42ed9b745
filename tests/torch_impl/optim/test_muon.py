"""torch_impl.optim.muon: the math of one step (`muon_step`), the shape rules and
`resolve_orthogonalizer`, on their own. The optimizer class around them is tested in
test_base.py, its sharded runs in tests/dist, the step against JAX in parity_tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_impl.optim.muon import SHAPE_SCALES, MuonHyper, as_matrix_shape, muon_step, normuon_state_shape, shape_scale
from torch_impl.orthogonalizers.newton_schulz import newton_schulz, polar_express
from torch_impl.orthogonalizers.registry import NS_EPS, ORTHOGONALIZERS, resolve_orthogonalizer

# ---- shape rules ---------------------------------------------------------------------------

SHAPE_FACTORS = {  # shape -> expected scale per rule; N-D shapes are viewed as (shape[0], rest)
    "max_ratio": {(32, 8): 2.0, (8, 32): 1.0, (16, 16): 1.0, (4, 3, 5): 1.0, (15, 2, 2): math.sqrt(15 / 4)},
    "match_rms_adamw": {(32, 8): 0.2 * math.sqrt(32), (8, 32): 0.2 * math.sqrt(32), (16, 16): 0.8,
                        (4, 3, 5): 0.2 * math.sqrt(15), (15, 2, 2): 0.2 * math.sqrt(15)},
}


@pytest.mark.parametrize("rule", sorted(SHAPE_FACTORS))
def test_shape_scale(rule):
    assert set(SHAPE_FACTORS) == set(SHAPE_SCALES)
    for shape, factor in SHAPE_FACTORS[rule].items():
        assert shape_scale(*as_matrix_shape(shape), rule) == pytest.approx(factor, rel=1e-15)  # float64 formula
    with pytest.raises(ValueError, match="max_ratio.*match_rms_adamw"):
        shape_scale(4, 4, "spectral")


def test_as_matrix_shape_and_normuon_state_shape():
    assert as_matrix_shape((8, 4)) == (8, 4)
    assert as_matrix_shape(torch.Size([4, 3, 2, 2])) == (4, 12)
    for bad in [(), (7,)]:
        with pytest.raises(ValueError, match="≥ 2 dims"):
            as_matrix_shape(bad)
    # one second moment per row of the larger side (ties: rows)
    assert normuon_state_shape(8, 4) == (8, 1)
    assert normuon_state_shape(4, 8) == (1, 8)
    assert normuon_state_shape(5, 5) == (5, 1)


# ---- resolve_orthogonalizer ---------------------------------------------------------------

def test_resolve_orthogonalizer_calls_with_keywords():
    # One orthogonalizer signature for both frameworks: f(X, *, steps, eps, compute_dtype).
    calls = []

    def spy(X, *, steps, eps, compute_dtype):  # keyword-only: a positional call fails
        calls.append((X.shape, X.dtype, steps, eps, compute_dtype))
        return X

    X = torch.ones(2, 4, 3)
    assert resolve_orthogonalizer(spy, 3, torch.float16)(X) is X
    assert calls == [((2, 4, 3), torch.float32, 3, NS_EPS, torch.float16)]


def test_resolve_orthogonalizer_binds_the_named_ones_without_their_finite_check():
    G = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    for name, f in (("newton_schulz", newton_schulz), ("polar_express", polar_express)):
        assert name in ORTHOGONALIZERS
        got = resolve_orthogonalizer(name, 4, torch.float32)(G)
        # the same function with the same arguments: bitwise
        assert torch.equal(got, f(G, steps=4, eps=NS_EPS, compute_dtype=torch.float32))
        # Muon checks gradients once per step, so the per-call check is off: NaN propagates
        assert torch.isnan(resolve_orthogonalizer(name, 4, torch.float32)(torch.full((8, 16), float("nan")))).all()


@pytest.mark.parametrize("bad, message", [("svd", "newton_schulz.*polar_express"), (3, "name or a callable")])
def test_resolve_orthogonalizer_rejects_unknown_names(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve_orthogonalizer(bad, 5, torch.float32)


# ---- muon_step against a numpy fp64 transcription of .specs/muon_math.md -------------------

def identity(X, steps, eps, compute_dtype):
    """Orthogonalizer stand-in: isolates momentum, NorMuon, decay and scale from NS."""
    return X


def hyper(**kw) -> MuonHyper:
    kw = dict(dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0, cautious_weight_decay=False,
                   normuon_beta2=None, shape_scale="max_ratio"), **kw)
    return MuonHyper(**kw, orthogonalize=resolve_orthogonalizer(identity, 5, torch.float32))


def reference_step(G, P, buf, v, *, lr, momentum, nesterov, weight_decay, cautious_weight_decay,
                   normuon_beta2, shape_scale):
    """One matrix, numpy fp64, orth = identity."""
    rows, cols = P.shape
    buf = buf + (1 - momentum) * (G - buf)
    O = G + momentum * (buf - G) if nesterov else buf
    if normuon_beta2 is not None:
        s = np.mean(O**2, axis=1 if rows >= cols else 0, keepdims=True)
        v = v + (1 - normuon_beta2) * (s - v)
        OD = O / np.sqrt(np.maximum(v, 1e-10))
        O = OD * np.linalg.norm(O) / max(np.linalg.norm(OD), 1e-10)
    scale = max(1, rows / cols) ** 0.5 if shape_scale == "max_ratio" else 0.2 * math.sqrt(max(rows, cols))
    mask = (O * P >= 0) if cautious_weight_decay else 1.0
    return P - lr * weight_decay * mask * P - lr * scale * O, buf, v


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


# Not 1×1: a relative error of one momentum entry that cancels to ~0 over two steps means nothing.
SHAPES = [(1, 8), (8, 1), (1, 32), (32, 1), (8, 8), (8, 32), (32, 8), (32, 32)]


@given(k=st.integers(1, 3), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1),
       lr=st.sampled_from([0.02, 0.1]), momentum=st.sampled_from([0.0, 0.9, 0.95]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]), cautious_weight_decay=st.booleans(),
       normuon_beta2=st.sampled_from([None, 0.95]), rule=st.sampled_from(SHAPE_SCALES))
def test_two_steps_match_numpy_fp64(k, shape, seed, lr, momentum, nesterov, weight_decay,
                                    cautious_weight_decay, normuon_beta2, rule):
    rows, cols = shape
    hp_kw = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                 cautious_weight_decay=cautious_weight_decay, normuon_beta2=normuon_beta2)
    rng = np.random.default_rng(seed)
    P0 = rng.standard_normal((k, rows, cols)).astype(np.float32)
    grads = [rng.standard_normal((k, rows, cols)).astype(np.float32) for _ in range(2)]
    P, M = torch.from_numpy(P0.copy()), torch.zeros(k, rows, cols)
    V = torch.zeros(k, *normuon_state_shape(rows, cols)) if normuon_beta2 is not None else None
    ref = [(P0[i].astype(np.float64), np.zeros((rows, cols)), np.zeros(normuon_state_shape(rows, cols)))
           for i in range(k)]
    for G in grads:
        g = torch.from_numpy(G.copy())
        muon_step(P, g, M, V, hyper(**hp_kw, shape_scale=rule))
        assert torch.equal(g, torch.from_numpy(G))  # gradients are read only
        ref = [reference_step(G[i].astype(np.float64), *ref[i], **hp_kw, shape_scale=rule) for i in range(k)]
    for i in range(k):
        # fp32 vs fp64 of a few elementwise ops per step (two lerps, a decay, an add; with NorMuon
        # a mean, an rsqrt and two norms): each a few u = 6e-8 relative, over two steps. Measured
        # worst relative Frobenius over 2000 draws: 1.4e-7 (params), 8e-8 (momentum), 3.9e-7
        # (second moment); tolerance ×~8. A wrong step is off by O(1e-2) or more.
        assert rel_err(P[i], ref[i][0]) <= 3e-6
        assert rel_err(M[i], ref[i][1]) <= 3e-6
        if normuon_beta2 is not None:
            assert rel_err(V[i], ref[i][2]) <= 3e-6


def test_stack_equals_one_matrix_at_a_time():
    """The K matrices of a stack never mix (NorMuon's norms are per matrix): elementwise ops and
    per-matrix reductions on the same numbers, so bitwise."""
    g = torch.Generator().manual_seed(1)
    P, G = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    M, V = torch.randn(3, 8, 16, generator=g), torch.rand(3, 1, 16, generator=g)
    hp = hyper(weight_decay=0.1, cautious_weight_decay=True, normuon_beta2=0.9)
    singles = [(P[i].clone()[None], M[i].clone()[None], V[i].clone()[None]) for i in range(3)]
    muon_step(P, G, M, V, hp)
    for i, (p, m, v) in enumerate(singles):
        muon_step(p, G[i][None], m, v, hp)
        assert torch.equal(p[0], P[i]) and torch.equal(m[0], M[i]) and torch.equal(v[0], V[i])


def test_orthogonalizer_gets_the_fp32_update_stack():
    seen = []

    def spy(X, *, steps, eps, compute_dtype):
        seen.append(X.clone())
        return X

    g = torch.Generator().manual_seed(2)
    P, G = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    M = torch.zeros(2, 4, 6)
    hp = MuonHyper(lr=0.1, momentum=0.5, nesterov=False, weight_decay=0.0, cautious_weight_decay=False,
                   normuon_beta2=None, shape_scale="max_ratio",
                   orthogonalize=resolve_orthogonalizer(spy, 5, torch.bfloat16))
    muon_step(P, G, M, None, hp)
    # without Nesterov the orthogonalizer sees the momentum buffer: lerp(0, G, 1/2) = G/2 exactly
    assert len(seen) == 1 and seen[0].dtype == torch.float32 and seen[0].shape == (2, 4, 6)
    assert torch.equal(seen[0], G / 2) and torch.equal(M, G / 2)
