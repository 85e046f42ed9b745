"""jax_reference.sharding.sharded: Muon/AdamW on parameters sharded by rows equals the single-device step
(.specs/muon_math.md §12), on 1–4 CPU devices (conftest.py sets XLA_FLAGS for 4).

The leaf set covers the layouts that break naive sharding: dim 0 not divisible by N (5 rows), dim 0
below N (2 rows at N = 3, 4), a 32×1 column, wide and tall matrices (NorMuon reduces over rows for
wide ones), a 3-D leaf stacked with a 2-D one of the same matrix view, stacks of 2 and 3 matrices
(chunk > 1, owners with empty slots), and bf16 leaves next to fp32 ones.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jax_reference.optim.hybrid import hybrid
from jax_reference.optim.muon import as_matrix_shape, muon, sharded_muon
from jax_reference.orthogonalizers.newton_schulz import newton_schulz
from jax_reference.sharding.placement import chunk_rows
from jax_reference.sharding.sharded import (
    AXIS,
    RowSharded,
    on_owners,
    row_mesh,
    shard_rows,
    sharded,
    unshard_rows,
)
from tests.jax_reference.optim.test_muon import examples

LEAVES = {
    "q": ((5, 8), jnp.float32),
    "k": ((5, 8), jnp.float32),
    "v": ((5, 8), jnp.bfloat16),
    "small": ((2, 8), jnp.float32),
    "conv": ((2, 2, 4), jnp.float32),  # viewed as (2, 8): stacks with "small"
    "col": ((32, 1), jnp.float32),
    "tall": ((24, 6), jnp.bfloat16),
}
N_STACKS = 4  # (5, 8) ×3, (2, 8) ×2, (32, 1), (24, 6): stacks are by matrix view
STEPS = 3
SCHEDULE = lambda count: 0.02 * (1.0 + count)  # a different lr each step: the count is checked too
CONFIGS = {
    # The defaults (bf16 NS5) with plain weight decay: bitwise (see assert_matches).
    "plain": dict(weight_decay=0.1),
    # NorMuon (global row means for wide leaves, global Frobenius norms), cautious decay, the
    # other options flipped, fp32 NS: equal to the last bits.
    "normuon": dict(normuon_beta2=0.95, cautious_weight_decay=True, weight_decay=0.1, nesterov=False,
                    orthogonalizer="polar_express", ns_steps=3, ns_dtype=jnp.float32, shape_scale="match_rms_adamw"),
}


def mesh_of(n):
    if jax.device_count() < n:
        flags = os.environ.get("XLA_FLAGS")
        pytest.skip(f"JAX sees {jax.device_count()} devices, the test needs {n} (XLA_FLAGS={flags!r})")
    return row_mesh(n)


def draw(seed):
    """Params and STEPS gradients with LEAVES' shapes and dtypes."""
    rng = np.random.default_rng(seed)
    tree = lambda: {k: jnp.asarray(rng.standard_normal(s), d) for k, (s, d) in LEAVES.items()}
    return tree(), [tree() for _ in range(STEPS)]


# Compiles are the cost (~2 s per mesh and config on 2 cores), so each stepper is built once and the
# hypothesis examples only draw new values.


@functools.cache
def reference_update(config):
    tx = muon(SCHEDULE, nonfinite="skip", **CONFIGS[config])  # "skip": jit-able without checkify
    return tx, jax.jit(tx.update)


@functools.cache
def sharded_update(config, n, orth_map=None):
    mesh = mesh_of(n)
    kwargs = dict(nonfinite="skip", **CONFIGS[config])
    if orth_map is None:
        tx = sharded_muon(mesh, SCHEDULE, **kwargs)
    else:
        tx = sharded(muon(SCHEDULE, orth_map=orth_map(mesh), **kwargs), mesh)
    return mesh, tx, jax.jit(tx.update)


def run_reference(config, params, grads):
    tx, update = reference_update(config)
    state = tx.init(params)
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def run_sharded(config, n, params, grads, orth_map=None):
    """STEPS sharded steps; returns the stored (RowSharded) params and state."""
    mesh, tx, update = sharded_update(config, n, orth_map)
    params = shard_rows(params, mesh)
    state = tx.init(params)
    for g in grads:
        u, state = update(shard_rows(g, mesh), state, params)
        params = optax.apply_updates(params, u)
    return params, state


def rel_to_max(x, ref):
    x, ref = (np.asarray(a, np.float64) for a in (x, ref))
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_matches(config, params, state, ref_params, ref_state):
    """The sharded trajectory equals the single-device one: bitwise ("plain"), or to the last bits."""
    params, state = unshard_rows(params), unshard_rows(state)
    assert int(state.count) == int(ref_state.count) == STEPS
    # Momentum is elementwise (§3) and never depends on orth: bitwise in every config.
    jax.tree.map(np.testing.assert_array_equal, state.momentum, ref_state.momentum)
    if config == "plain":
        # Every op outside orth is elementwise, no floating-point sum is split across devices, and the
        # owner runs the same orth code on the same whole matrix (one matrix per call, as the
        # single-device step): bitwise, bf16 leaves included. Measured exact over 150 seeds × N ∈ 1..4.
        jax.tree.map(np.testing.assert_array_equal, params, ref_params)
        return
    # "normuon" is not bitwise, for two measured reasons: (a) NorMuon's row means (wide leaves) and
    # Frobenius norms (§5) are global sums that XLA computes as per-shard partial sums plus an
    # all-reduce, another summation order than one device's; (b) with fp32 NS, XLA compiles the NS
    # step's multiply-adds differently inside the shard_map than inline in the single-device program
    # (one NS step already differs in the last bit), and NS amplifies that (Polar Express's slope at
    # small σ is ~8 per step). Worst cases over 300 seeds × N ∈ 1..4; each tolerance is ×4 that.
    # A shard orthogonalized on its own is off by ~1e-2 of max|P| (test_a_per_shard_... below).
    for k, (_, dtype) in LEAVES.items():
        if dtype == jnp.bfloat16:
            # fp32 values a few ulps apart round to neighbouring bf16 values now and then: measured at
            # most 1 element per leaf, by one bf16 ulp (spacing ≤ |x|·2⁻⁷). Allowed: 2 such elements.
            diff = np.abs(np.asarray(params[k], np.float64) - np.asarray(ref_params[k], np.float64))
            ulp = np.abs(np.asarray(ref_params[k], np.float64)) * 2.0**-7
            assert np.all(diff <= ulp) and np.sum(diff > 0) <= 2, k
        else:
            # Measured max|ΔP| / max|P| ≤ 2.4e-7, about 2 ulps of the largest entry.
            assert rel_to_max(params[k], ref_params[k]) <= 1e-6, k
        # v = lerp of mean(O²): carries (b) twice over; measured ≤ 1.2e-5 of max|v|.
        assert rel_to_max(state.second_moment[k], ref_state.second_moment[k]) <= 5e-5, k


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@examples(0.3)
@given(seed=st.integers(0, 2**32 - 1))
def test_sharded_step_equals_single_device(n, config, seed):
    params, grads = draw(seed)
    ref_params, ref_state = run_reference(config, params, grads)
    sharded_params, sharded_state = run_sharded(config, n, params, grads)
    assert_matches(config, sharded_params, sharded_state, ref_params, ref_state)


def test_params_and_state_live_sharded():
    n = 3
    params, grads = draw(0)
    stored_params, state = run_sharded("normuon", n, params, grads)
    arrays = {"param": stored_params, "momentum": state.momentum, "second moment": state.second_moment}
    for what, tree in arrays.items():
        for k, x in tree.items():
            assert isinstance(x, RowSharded), (what, k)
            rows = x.rows
            c = chunk_rows(rows, n)
            assert x.data.sharding.spec == P(AXIS) and x.data.shape[0] == c * n, (what, k)
            shards = sorted(x.data.addressable_shards, key=lambda s: s.device.id)
            assert len(shards) == n and all(s.data.shape == (c,) + x.data.shape[1:] for s in shards), (what, k)
            # The padding rows beyond the logical ones stay zero step after step.
            np.testing.assert_array_equal(x.data[rows:], 0)
    # Wide leaves keep v as (1, cols): one logical row, on device 0; tall ones (rows, 1), split.
    assert state.second_moment["small"].rows == 1 and state.second_moment["tall"].rows == 24
    assert state.count.sharding.spec == P()  # the step count is replicated
    # The logical values have the parameters' shapes and dtypes.
    for k, (shape, dtype) in LEAVES.items():
        assert unshard_rows(stored_params)[k].shape == shape and stored_params[k].data.dtype == dtype


def test_one_all_to_all_each_way_per_stack():
    # The only communication of the plain step: two all_to_alls per same-shape stack, never an
    # all-gather of a matrix (the nonfinite="skip" flag adds one all-reduce of a bool).
    mesh, tx, update = sharded_update("plain", 4)
    params, grads = draw(0)
    params = shard_rows(params, mesh)
    hlo = update.lower(shard_rows(grads[0], mesh), tx.init(params), params).compile().as_text()
    ops = lambda name: len(re.findall(rf"\b{name}(-start)?\(", hlo))
    assert ops("all-to-all") == 2 * N_STACKS
    assert ops("all-gather") == ops("collective-permute") == ops("reduce-scatter") == 0
    assert ops("all-reduce") == 1


# ---- the orthogonalizer sees whole matrices, and the equality test would notice if not ----------


def per_shard(mesh):
    """A planted bug (the public pitfall): orth run on each device's rows alone, no relayout."""
    n = mesh.shape[AXIS]

    def orth_map(orthogonalize, matrices):
        def one(X):
            rows = X.shape[0]
            X = jnp.pad(X, ((0, chunk_rows(rows, n) * n - rows), (0, 0)))
            on_device = lambda local: orthogonalize(local).astype(local.dtype)
            return jax.shard_map(on_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))(X)[:rows]

        return jax.tree.map(one, matrices)

    return orth_map


def test_orthogonalizer_sees_whole_matrices():
    seen = []

    def probe(X, steps, eps, compute_dtype):  # runs at trace time: records the shape it is given
        seen.append(tuple(X.shape))
        return newton_schulz(X, steps=steps, eps=eps, compute_dtype=compute_dtype)

    mesh = mesh_of(4)
    params, grads = draw(1)
    for orth_map, expect_whole in [(on_owners, True), (per_shard, False)]:
        seen.clear()
        tx = sharded(muon(0.02, orthogonalizer=probe, nonfinite="skip", orth_map=orth_map(mesh)), mesh)
        stored = shard_rows(params, mesh)
        jax.eval_shape(tx.update, shard_rows(grads[0], mesh), tx.init(stored), stored)
        whole = {as_matrix_shape(s) for s, _ in LEAVES.values()}
        assert (set(seen) == whole) is expect_whole, seen


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_per_shard_orthogonalizer_fails_the_equality_test(config):
    params, grads = draw(2)
    ref_params, ref_state = run_reference(config, params, grads)
    bad_params, bad_state = run_sharded(config, 3, params, grads, orth_map=per_shard)
    with pytest.raises(AssertionError):
        assert_matches(config, bad_params, bad_state, ref_params, ref_state)
    # Not a last-bit effect: measured 6e-2 (plain) and 3e-2 (normuon) of max|P| after 3 steps,
    # against tolerances of 0 and 1e-6.
    worst = max(rel_to_max(unshard_rows(bad_params)[k], ref_params[k]) for k, (_, d) in LEAVES.items()
                if d == jnp.float32)
    assert worst > 1e-3


# ---- the hybrid and the non-finite policy on sharded parameters -------------------------------------


def test_hybrid_on_sharded_params_equals_single_device():
    # Muon for block matrices, AdamW (elementwise, §8) for the rest: bitwise, as for "plain" above.
    rng = np.random.default_rng(3)
    shapes = {
        "transformer.wte.weight": (10, 8),
        "transformer.h.0.attn.c_q.weight": (8, 8),
        "transformer.h.0.attn.c_k.weight": (8, 8),
        "transformer.h.0.mlp.c_fc.weight": (18, 8),
        "transformer.h.0.mlp.c_proj.weight": (8, 18),
        "lm_head.weight": (10, 8),
        "resid_lambdas": (2,),
    }
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(2)]
    mesh = mesh_of(3)
    kwargs = dict(weight_decay=0.1, nonfinite="skip", lr_multiplier=lambda step: 1.0 - 0.1 * step)
    ref_tx = hybrid(params, **kwargs)
    tx = sharded(hybrid(params, orth_map=on_owners(mesh), **kwargs), mesh)
    ref_update, update = jax.jit(ref_tx.update), jax.jit(tx.update)
    ref_state, stored = ref_tx.init(params), shard_rows(params, mesh)
    state = tx.init(stored)
    for g in grads:
        u, ref_state = ref_update(g, ref_state, params)
        params = optax.apply_updates(params, u)
        u, state = update(shard_rows(g, mesh), state, stored)
        stored = optax.apply_updates(stored, u)
    jax.tree.map(np.testing.assert_array_equal, unshard_rows(stored), params)
    jax.tree.map(np.testing.assert_array_equal, unshard_rows(state), ref_state)
    assert all(x.data.sharding.spec == P(AXIS) for x in jax.tree.leaves(stored, is_leaf=lambda x: isinstance(
        x, RowSharded)))


def test_nonfinite_raise_names_the_leaf_under_checkify():
    mesh = mesh_of(2)
    params = {"w": jnp.ones((5, 8)), "u": jnp.ones((3, 4))}
    tx = sharded_muon(mesh, 0.02)  # nonfinite="raise" (§9)
    stored = shard_rows(params, mesh)
    bad = shard_rows({"w": params["w"].at[4, 2].set(jnp.nan), "u": params["u"]}, mesh)
    err, _ = checkify.checkify(jax.jit(tx.update))(bad, tx.init(stored), stored)
    with pytest.raises(checkify.JaxRuntimeError, match=r"non-finite gradient at \['w'\]"):
        err.throw()


def test_a_mesh_with_explicit_axes_is_refused():
    # jax.make_mesh's default (Explicit) axes would fail deep inside the step; say so up front.
    mesh_of(2)
    with pytest.raises(ValueError, match="Auto axis 'x'"):
        sharded_muon(jax.make_mesh((2,), (AXIS,), axis_types=(AxisType.Explicit,)), 0.02)
    with pytest.raises(ValueError, match="Auto axis 'x'"):
        shard_rows({"w": jnp.ones((4, 4))}, Mesh(np.array(jax.devices()[:2]), ("rows",)))
