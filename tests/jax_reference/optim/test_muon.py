"""jax_reference.optim.muon against numpy fp64 (JAX only); the hybrid built on it is tested in
test_hybrid.py, the non-finite policy module in test_nonfinite.py.

Each transform of the chain (.specs/muon_math.md §3–§7) is tested on its own,
then muon() as a whole against a numpy fp64 transcription of the spec.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from jax_reference.optim.muon import (
    MuonState,
    NorMuonState,
    OrthogonalizedMomentumState,
    add_cautious_decayed_weights,
    as_matrix_shape,
    muon,
    normuon,
    normuon_state_shape,
    scale_by_normuon,
    scale_by_orthogonalized_momentum,
    scale_by_shape,
    shape_scale,
)
from jax_reference.optim.nonfinite import NonFiniteGradientError
from jax_reference.orthogonalizers.newton_schulz import newton_schulz, polar_express
from jax_reference.orthogonalizers.registry import resolve_orthogonalizer

field = optax.tree_utils.tree_get  # finds a state field by name anywhere in a nested state

# Op-by-op dispatch compiles every op once per new shape (~1 s per shape for a
# full Muon step on 2 cores), so the trajectory tests use two sizes: enough
# for wide, tall and square, which is all the elementwise math cares about.
DIMS = st.sampled_from([8, 32])
SEEDS = st.integers(0, 2**32 - 1)


def examples(fraction=1.0):
    """The active Hypothesis profile's example count (conftest.py), scaled down for costly tests."""
    return settings(max_examples=max(3, round(settings().max_examples * fraction)), deadline=None)


def identity(X, steps, eps, compute_dtype):
    """Orthogonalizer stand-in: isolates steps 1, 2, 4, 5, 6 from step 3."""
    return X


def reference_step(G, P, buf, v, *, lr, mu, nesterov, wd, cautious, beta2, shape_scale):
    """.specs/muon_math.md eqs. (1)-(9) in numpy fp64, with orth = identity."""
    shape = P.shape
    rows, cols = shape[0], int(np.prod(shape[1:]))
    G, P, buf = (np.asarray(x, np.float64).reshape(rows, cols) for x in (G, P, buf))
    buf = buf + (1 - mu) * (G - buf)
    O = G + mu * (buf - G) if nesterov else buf
    if beta2 is not None:
        s = np.mean(O**2, axis=1 if rows >= cols else 0, keepdims=True)
        v = v + (1 - beta2) * (s - v)
        OD = O / np.sqrt(np.maximum(v, 1e-10))
        O = OD * np.linalg.norm(O) / max(np.linalg.norm(OD), 1e-10)
    scale = max(1, rows / cols) ** 0.5 if shape_scale == "max_ratio" else 0.2 * math.sqrt(max(rows, cols))
    mask = (O * P >= 0) if cautious else 1.0
    new_P = P - lr * wd * mask * P - lr * scale * O
    return new_P.reshape(shape), buf.reshape(shape), v


def rel_err(x, ref):
    x = np.asarray(x).astype(np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def trajectory_errors(m, n, seed, nesterov, wd, cautious, beta2, shape_scale):
    """Relative errors of two JAX steps vs reference_step: (updates, final state)."""
    rng = np.random.default_rng(seed)
    # A 2-D leaf of the drawn shape and a 3-D one viewed as (4, 15), nested.
    params = {"block": {"w": rng.standard_normal((m, n))}, "conv": rng.standard_normal((4, 3, 5))}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params) for _ in range(2)]
    mu = 0.9
    schedule = lambda count: 0.05 * (1.0 + count)  # lr 0.05 then 0.1: checks the count used
    tx = muon(
        schedule, momentum=mu, nesterov=nesterov, orthogonalizer=identity, weight_decay=wd,
        cautious_weight_decay=cautious, normuon_beta2=beta2, shape_scale=shape_scale,
    )
    state = tx.init(params)
    assert isinstance(state, MuonState) and state.count.dtype == jnp.int32
    leaves = lambda tree: jax.tree.leaves(tree)
    ref_p = [np.asarray(p, np.float64) for p in leaves(params)]
    ref_buf = [np.zeros_like(p) for p in ref_p]
    ref_v = [np.zeros((p.shape[0], 1) if p.shape[0] >= p[0].size else (1, p[0].size)) for p in ref_p]
    update_errs, state_errs = [], []
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        assert int(state.count) == step + 1
        for i, (gi, ui) in enumerate(zip(leaves(g), leaves(updates))):
            before = ref_p[i]
            ref_p[i], ref_buf[i], ref_v[i] = reference_step(
                gi, ref_p[i], ref_buf[i], ref_v[i], lr=schedule(step), mu=mu, nesterov=nesterov,
                wd=wd, cautious=cautious, beta2=beta2, shape_scale=shape_scale,
            )
            update_errs.append(rel_err(ui, ref_p[i] - before))
    state_errs += [rel_err(p, r) for p, r in zip(leaves(params), ref_p)]
    state_errs += [rel_err(b, r) for b, r in zip(leaves(state.momentum), ref_buf)]
    if beta2 is None:
        assert state.second_moment is None
    else:
        state_errs += [rel_err(v, r) for v, r in zip(leaves(state.second_moment), ref_v)]
    return max(update_errs), max(state_errs)


@examples()
@given(
    m=DIMS,
    n=DIMS,
    seed=SEEDS,
    nesterov=st.booleans(),
    wd=st.sampled_from([0.0, 0.1]),
    cautious=st.booleans(),
    beta2=st.sampled_from([None, 0.95]),
    shape_scale=st.sampled_from(["max_ratio", "match_rms_adamw"]),
)
def test_two_steps_match_numpy(m, n, seed, nesterov, wd, cautious, beta2, shape_scale):
    update_err, state_err = trajectory_errors(m, n, seed, nesterov, wd, cautious, beta2, shape_scale)
    # fp32 vs fp64 of a few elementwise ops (plus two norms with NorMuon):
    # measured worst rel Frobenius error 5.6e-7 on the updates and 3.9e-7
    # on params/momentum/second moment over 300 random configs; tolerance
    # x ~5. A wrong step is off by O(1e-2) or more.
    assert update_err <= 3e-6
    assert state_err <= 3e-6


@pytest.mark.parametrize("nesterov", [False, True])
def test_nesterov_off_and_on(nesterov):
    # Momentum μ = 0.5, first step from buf = 0: buf = G/2, so the update
    # direction is buf = G/2 without Nesterov and lerp(G, buf, μ) = 3G/4 with it.
    G = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    tx = muon(1.0, momentum=0.5, nesterov=nesterov, orthogonalizer=identity)
    params = {"w": np.zeros_like(G)}
    updates, state = tx.update({"w": G}, tx.init(params), params)
    np.testing.assert_allclose(state.momentum["w"], G / 2, rtol=1e-7)  # one f32 lerp: ~1 ulp
    np.testing.assert_allclose(-updates["w"], G * (0.75 if nesterov else 0.5), rtol=1e-6)  # two ops: a few ulps


def test_cautious_weight_decay_mask():
    # μ = 0 and identity orth make O = G, so each element's decay is visible:
    # decayed where G·P >= 0 (exact zeros included), untouched where G·P < 0.
    P = np.array([[1.0, 1.0, -1.0, 2.0], [1.0, -1.0, 0.0, 3.0]], np.float32)
    G = np.array([[1.0, -1.0, -1.0, 0.0], [-2.0, -1.0, 5.0, 0.5]], np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], np.float32)
    lr, wd = 0.1, 0.5
    for cautious, expected_mask in [(True, mask), (False, np.ones_like(mask))]:
        tx = muon(lr, momentum=0.0, orthogonalizer=identity, weight_decay=wd, cautious_weight_decay=cautious)
        updates, _ = tx.update({"w": G}, tx.init({"w": P}), {"w": P})
        expected = -lr * wd * expected_mask * P - lr * 1.0 * G  # 2x4 is wide: max_ratio scale 1
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-6, atol=1e-7)  # a few f32 ulps


@examples(0.6)
@given(m=DIMS, n=DIMS, seed=SEEDS)
def test_normuon_preserves_frobenius_norm(m, n, seed):
    rng = np.random.default_rng(seed)
    O = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    v_shape = (m, 1) if m >= n else (1, n)
    v = jnp.asarray(rng.uniform(0.0, 1.0, v_shape), jnp.float32)
    out, new_v = normuon(O, v, 0.95)
    assert new_v.shape == v_shape
    # Two f32 norms, a ratio and a multiply: measured ≤ 2.4e-7 relative over
    # 200 draws; tolerance x ~4.
    assert abs(float(jnp.linalg.norm(out)) / float(jnp.linalg.norm(O)) - 1) <= 1e-6
    assert not np.allclose(out, O, atol=1e-3)  # it did renormalize rows/cols


@pytest.mark.parametrize("name, orth", [("newton_schulz", newton_schulz), ("polar_express", polar_express)])
def test_named_orthogonalizers_dispatch(name, orth):
    # μ = 0, lr = 1, wide matrix (scale 1): the update is exactly -orth(G).
    G = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    tx = muon(1.0, momentum=0.0, ns_steps=5, orthogonalizer=name)
    updates, _ = tx.update({"w": G}, tx.init({"w": G}), {"w": G})
    np.testing.assert_array_equal(-updates["w"], orth(G, steps=5))  # same code path: bitwise


# ---- the transforms of the chain, one at a time (.specs/muon_math.md §3–§7) ----


def run_transform(tx, updates_seq, params):
    """Feed `tx` each update tree in turn; returns (its outputs, final state)."""
    state, outs = tx.init(params), []
    for u in updates_seq:
        out, state = tx.update(u, state, params)
        outs.append(out)
    return outs, state


def row_normalize(X, steps, eps, compute_dtype):
    """A layout-sensitive orth stand-in: every row of the (rows, cols) view scaled to unit norm."""
    assert X.ndim == 2 and X.dtype == jnp.float32
    return X / jnp.linalg.norm(X, axis=1, keepdims=True)


@pytest.mark.parametrize("nesterov", [False, True])
def test_scale_by_orthogonalized_momentum(nesterov):
    # Two steps on a 2-D and a 3-D leaf against eqs. (1)-(3) in numpy fp64. The orth
    # stand-in normalizes the rows of the (shape[0], prod(rest)) view, so a wrong
    # matrix view of the 3-D leaf would show.
    rng = np.random.default_rng(10)
    shapes = {"w": (8, 16), "conv": (4, 3, 5)}
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
    mu = 0.9
    tx = scale_by_orthogonalized_momentum(mu, nesterov, resolve_orthogonalizer(row_normalize, 5, jnp.float32))
    outs, state = run_transform(tx, grads, params)
    assert isinstance(state, OrthogonalizedMomentumState)
    for k, shape in shapes.items():
        rows, cols = as_matrix_shape(shape)
        M = np.zeros((rows, cols))
        for g, out in zip(grads, outs):
            G = g[k].astype(np.float64).reshape(rows, cols)
            M = M + (1 - mu) * (G - M)
            U = G + mu * (M - G) if nesterov else M
            O = U / np.linalg.norm(U, axis=1, keepdims=True)
            assert out[k].shape == shape and out[k].dtype == jnp.float32
            # Two lerps, a 16-term norm and a division in f32 (u ≈ 6e-8) per entry:
            # measured ≤ 2.1e-7 relative Frobenius over 200 draws; tolerance x ~7.
            assert rel_err(out[k], O.reshape(shape)) <= 1.5e-6
        assert state.momentum[k].dtype == jnp.float32
        # Momentum alone: two f32 lerps of O(1) values, measured ≤ 6e-8 over 200
        # draws; tolerance x ~10.
        assert rel_err(state.momentum[k], M.reshape(shape)) <= 6e-7


@examples(0.6)
@given(m=DIMS, n=DIMS, seed=SEEDS)
def test_scale_by_normuon(m, n, seed):
    # Two steps on an (m, n) leaf and a 3-D leaf viewed as (4, 15) against
    # eqs. (4)-(6) in numpy fp64; v has normuon_state_shape of the matrix view.
    rng = np.random.default_rng(seed)
    shapes = {"w": (m, n), "conv": (4, 3, 5)}
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    updates = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
    beta2 = 0.9
    outs, state = run_transform(scale_by_normuon(beta2), updates, params)
    assert isinstance(state, NorMuonState)
    for k, shape in shapes.items():
        rows, cols = as_matrix_shape(shape)
        v = np.zeros(normuon_state_shape(rows, cols))
        assert state.second_moment[k].shape == v.shape and state.second_moment[k].dtype == jnp.float32
        for u, out in zip(updates, outs):
            O = u[k].astype(np.float64).reshape(rows, cols)
            v = v + (1 - beta2) * (np.mean(O**2, axis=1 if rows >= cols else 0, keepdims=True) - v)
            OD = O / np.sqrt(np.maximum(v, 1e-10))
            ref = OD * np.linalg.norm(O) / max(np.linalg.norm(OD), 1e-10)
            assert out[k].shape == shape
            # f32 means, rsqrt, two norms and a ratio: measured ≤ 1.1e-6 relative
            # Frobenius over 400 draws (all four shape pairs); tolerance x ~5.
            assert rel_err(out[k], ref.reshape(shape)) <= 5e-6
        # v: two f32 EMA steps of a mean of squares, measured ≤ 1e-7 over 400
        # draws; tolerance x ~10.
        assert rel_err(state.second_moment[k], v) <= 1e-6


SHAPE_FACTORS = {  # leaf shape -> expected s of eq. (7), per rule; (4, 3, 5) is viewed as (4, 15)
    "max_ratio": {(32, 8): 2.0, (8, 32): 1.0, (16, 16): 1.0, (4, 3, 5): 1.0, (15, 2, 2): math.sqrt(15 / 4)},
    "match_rms_adamw": {(32, 8): 0.2 * math.sqrt(32), (8, 32): 0.2 * math.sqrt(32), (16, 16): 0.8,
                        (4, 3, 5): 0.2 * math.sqrt(15), (15, 2, 2): 0.2 * math.sqrt(15)},
}


@pytest.mark.parametrize("rule", sorted(SHAPE_FACTORS))
def test_scale_by_shape(rule):
    rng = np.random.default_rng(11)
    updates = {str(s): rng.standard_normal(s).astype(np.float32) for s in SHAPE_FACTORS[rule]}
    tx = scale_by_shape(rule)
    out, state = tx.update(updates, tx.init(updates), updates)
    assert state == optax.EmptyState()
    for s, factor in SHAPE_FACTORS[rule].items():
        assert shape_scale(*as_matrix_shape(s), rule) == pytest.approx(factor, rel=1e-15)  # float64 formula
        # One f32 multiply by the f32-rounded factor in both: bitwise.
        np.testing.assert_array_equal(out[str(s)], updates[str(s)] * np.float32(shape_scale(*as_matrix_shape(s), rule)))
    with pytest.raises(ValueError, match="max_ratio.*match_rms_adamw"):
        scale_by_shape("spectral")


def test_add_cautious_decayed_weights():
    # Decay wd·P where u·P >= 0 (exact zeros included), nothing where u·P < 0. The
    # incoming u = s·O (after scale_by_shape) has O's signs for any s > 0, so the mask
    # does not depend on s, and the decay term wd·P is not scaled by s.
    P = np.array([[1.0, 1.0, -1.0, 2.0], [1.0, -1.0, 0.0, 3.0]], np.float32)
    O = np.array([[1.0, -1.0, -1.0, 0.0], [-2.0, -1.0, 5.0, 0.5]], np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], np.float32)
    tx = add_cautious_decayed_weights(0.5)
    for s in (1.0, 2.0):
        out, _ = tx.update({"w": s * O}, tx.init({"w": P}), {"w": P})
        # Small dyadic values: every product and sum is exact in f32, so bitwise.
        np.testing.assert_array_equal(out["w"], s * O + 0.5 * mask * P)
    out, _ = add_cautious_decayed_weights(0.0).update({"w": O}, optax.EmptyState(), {"w": P})
    np.testing.assert_array_equal(out["w"], O)  # wd = 0: the identity
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": O}, tx.init({"w": P}))


def test_resolve_orthogonalizer_calls_with_keywords():
    # One orthogonalizer signature for both frameworks: f(X, steps=, eps=, compute_dtype=).
    calls = []

    def spy(X, *, steps, eps, compute_dtype):  # keyword-only: a positional call fails
        calls.append((X.shape, X.dtype, steps, eps, compute_dtype))
        return X

    tx = muon(0.02, orthogonalizer=spy, ns_steps=3, eps=1e-5, ns_dtype=jnp.float16)
    params = {"conv": np.ones((4, 3, 5), np.float32)}
    tx.update(params, tx.init(params), params)
    assert calls == [((4, 15), jnp.float32, 3, 1e-5, jnp.float16)]
    with pytest.raises(ValueError, match="newton_schulz.*polar_express"):
        resolve_orthogonalizer("svd", 5, jnp.float32)


def test_muon_is_the_chain_of_its_transforms():
    # muon() = guard(in_float32(chain of the public transforms)): applying them one
    # after the other to fp32 inputs gives the same update and state, bitwise.
    rng = np.random.default_rng(2)
    G, P = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    params = {"w": P}
    transforms = [
        scale_by_orthogonalized_momentum(0.9, True, resolve_orthogonalizer("newton_schulz", 5, jnp.bfloat16)),
        scale_by_normuon(0.9),
        scale_by_shape("max_ratio"),
        add_cautious_decayed_weights(0.1),
        optax.scale_by_learning_rate(0.02),
    ]
    u, states = {"w": G}, []
    for t in transforms:
        u, s = t.update(u, t.init(params), params)
        states.append(s)
    tx = muon(0.02, momentum=0.9, nesterov=True, weight_decay=0.1, cautious_weight_decay=True, normuon_beta2=0.9)
    updates, state = tx.update({"w": G}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], u["w"])
    np.testing.assert_array_equal(state.momentum["w"], states[0].momentum["w"])
    np.testing.assert_array_equal(state.second_moment["w"], states[1].second_moment["w"])
    assert int(state.count) == 1
    # The state names the chain's states in chain order; tree_get finds the same leaves.
    assert isinstance(state, MuonState) and state._fields == (
        "orthogonalized_momentum", "normuon", "shape_scale", "weight_decay", "learning_rate")
    for name in ("momentum", "second_moment", "count"):
        jax.tree.map(np.testing.assert_array_equal, field(state, name), getattr(state, name))


def test_bf16_params_fp32_state():
    rng = np.random.default_rng(3)
    P = rng.standard_normal((16, 32)).astype(np.float32)
    G = rng.standard_normal((16, 32)).astype(np.float32)
    tx = muon(0.02, normuon_beta2=0.95, weight_decay=0.1)
    p16, g16 = jnp.asarray(P, jnp.bfloat16), jnp.asarray(G, jnp.bfloat16)
    updates, state = tx.update({"w": g16}, tx.init({"w": p16}), {"w": p16})
    assert updates["w"].dtype == jnp.bfloat16
    assert state.momentum["w"].dtype == jnp.float32 and state.second_moment["w"].dtype == jnp.float32
    # Same fp32 math on the bf16-rounded inputs, then one rounding to bf16.
    ref, _ = tx.update({"w": jnp.asarray(g16, jnp.float32)}, tx.init({"w": P}), {"w": jnp.asarray(p16, jnp.float32)})
    np.testing.assert_array_equal(updates["w"], ref["w"].astype(jnp.bfloat16))


def test_leaf_with_ndim_below_2_is_named():
    params = {"w": np.ones((4, 4), np.float32), "norm": {"bias": np.ones((4,), np.float32)}}
    with pytest.raises(ValueError, match=r"\['norm'\]\['bias'\].*\(4,\)"):
        muon(0.02).init(params)
    tx = muon(0.02)
    state = tx.init({"w": params["w"]})
    with pytest.raises(ValueError, match=r"\['b'\].*\(\)"):
        tx.update({"w": params["w"], "b": np.float32(1.0)}, state, {"w": params["w"], "b": np.float32(1.0)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orthogonalizer": "svd"}, "newton_schulz.*polar_express"),
        ({"shape_scale": "spectral"}, "max_ratio.*match_rms_adamw"),
        ({"nonfinite": "ignore"}, "raise.*skip"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        muon(0.02, **kwargs)


def _params_and_bad_grads():
    rng = np.random.default_rng(4)
    params = {"a": rng.standard_normal((8, 16)).astype(np.float32),
              "b": rng.standard_normal((16, 8)).astype(np.float32)}
    bad = {"a": params["a"].copy(), "b": params["b"].copy()}
    bad["b"][3, 2] = np.inf
    return params, bad


def test_nonfinite_raise():
    params, bad = _params_and_bad_grads()
    tx = muon(0.02)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"non-finite gradient at \['b'\]"):
        tx.update(bad, state, params)
    with pytest.raises(NonFiniteGradientError, match=r"\['b'\]"):  # the named subclass
        tx.update(bad, state, params)
    # Under jit the check is a checkify.check: functionalize it to see it.
    err, _ = checkify.checkify(jax.jit(tx.update))(bad, state, params)
    with pytest.raises(checkify.JaxRuntimeError, match=r"non-finite gradient at \['b'\]"):
        err.throw()
    err, _ = checkify.checkify(jax.jit(tx.update))(params, state, params)
    assert err.get() is None


@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_skip_is_a_no_op(jit):
    params, bad = _params_and_bad_grads()
    tx = muon(0.02, normuon_beta2=0.95, nonfinite="skip")
    update = jax.jit(tx.update) if jit else tx.update
    _, state = update(params, tx.init(params), params)  # one real step first
    updates, new_state = update(bad, state, params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, 0.0)
    assert int(new_state.count) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


# ---- bad input and the non-finite policy (the torch side: tests/torch_impl/optim/test_base.py) ----


def test_muon_rejects_vectors_naming_them():
    with pytest.raises(ValueError, match="bias"):
        muon(0.02).init({"layer.bias": jnp.zeros(7)})


def test_unknown_orthogonalizer_lists_valid_names():
    with pytest.raises(ValueError, match="newton_schulz.*polar_express|polar_express.*newton_schulz"):
        muon(0.02, orthogonalizer="svd")


def test_nonfinite_gradient_raises_naming_the_parameter_before_writing_anything():
    tx = muon(0.02, ns_dtype=jnp.float32)
    params = {"good": jnp.ones((4, 4)), "bad": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="bad"):
        tx.update({"good": jnp.ones((4, 4)), "bad": jnp.full((4, 4), jnp.nan)}, tx.init(params), params)


def test_nonfinite_skip_leaves_everything_untouched():
    tx = muon(0.02, ns_dtype=jnp.float32, nonfinite="skip")
    params = jnp.ones((4, 4))
    state = tx.init(params)
    updates, new_state = tx.update(jnp.full((4, 4), jnp.inf), state, params)
    assert not np.any(np.asarray(updates)) and int(new_state.count) == 0
