"""jax_reference.optim.hybrid: the nanochat hybrid split (Muon + three AdamW groups), JAX only."""

import jax
import numpy as np
import pytest

from jax_reference.optim import hybrid as JO
from jax_reference.optim.adamw import adamw
from jax_reference.optim.hybrid import hybrid, label_param
from jax_reference.optim.muon import muon


def test_label_param():
    assert label_param("transformer.h.0.attn.c_q.weight", (64, 64)) == "muon"
    assert label_param("transformer.h.3.mlp.c_fc.weight", (256, 64)) == "muon"
    assert label_param("transformer.h.0.attn.lambda", (4,)) == "scalar"
    assert label_param("transformer.wte.weight", (100, 64)) == "embedding"
    assert label_param("lm_head.weight", (100, 64)) == "unembedding"
    assert label_param("resid_lambdas", (2,)) == "scalar"
    assert label_param("x0_lambdas", ()) == "scalar"
    assert label_param("value_proj.weight", (64, 64)) == "scalar"


def test_hybrid_routes_groups_with_width_scaled_lrs():
    rng = np.random.default_rng(5)
    shapes = {
        "transformer.wte.weight": (32, 16),
        "transformer.h.0.attn.c_q.weight": (16, 16),
        "transformer.h.0.mlp.c_fc.weight": (32, 16),  # tall: max_ratio scale sqrt(2)
        "lm_head.weight": (32, 16),
        "resid_lambdas": (2,),
    }
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    mult = lambda step: 0.5  # lr_multiplier applies to every group
    tx = hybrid(params, model_dim=3072, lr_multiplier=mult, weight_decay=0.1, nonfinite="skip")
    updates, _ = tx.update(grads, tx.init(params), params)

    width = (3072 / 768) ** -0.5
    expected_tx = {
        "muon": muon(0.02 * 0.5, weight_decay=0.1, nonfinite="skip"),
        "embedding": adamw(0.2 * width * 0.5, 0.8, 0.95, 1e-10),
        "unembedding": adamw(0.004 * width * 0.5, 0.8, 0.95, 1e-10),
        "scalar": adamw(0.5 * width * 0.5, 0.8, 0.95, 1e-10),
    }
    for name in shapes:
        group = expected_tx[label_param(name, shapes[name])]
        p, g = {name: params[name]}, {name: grads[name]}
        expected, _ = group.update(g, group.init(p), p)
        # Same ops; only lr is a schedule output (traced f32) instead of a
        # Python constant, which may move the last f32 bit of lr·x.
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6, atol=0)


def test_hybrid_skip_skips_every_group():
    params = {"transformer.h.0.w": np.ones((8, 8), np.float32), "transformer.wte.weight": np.ones((4, 8), np.float32)}
    grads = {"transformer.h.0.w": np.ones((8, 8), np.float32),
             "transformer.wte.weight": np.full((4, 8), np.nan, np.float32)}
    tx = hybrid(params, nonfinite="skip")
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, 0.0)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


@pytest.mark.parametrize("wrapped,canonical", [
    ("_orig_mod.transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_q.weight"),
    ("transformer.h.0._checkpoint_wrapped_module.attn.c_q.weight", "transformer.h.0.attn.c_q.weight"),
    ("module.lm_head.weight", "lm_head.weight"),
    ("transformer.h.0.mlp.module.weight", "transformer.h.0.mlp.module.weight"),  # only a leading "module."
])
def test_labels_use_the_canonical_name(wrapped, canonical):
    assert JO.canonical_name(wrapped) == canonical
    assert JO.label_param(wrapped, (8, 8)) == JO.label_param(canonical, (8, 8))
    assert JO.label_param("_orig_mod.transformer.h.0.attn.c_q.weight", (8, 8)) == "muon"
