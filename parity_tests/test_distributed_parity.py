"""DistMuon / DistAdamW in 3 spawned gloo ranks (different data per rank) against the JAX
reference fed the fp32 mean gradients.

The runs are tests/dist/test_sharded_equals_single_device.py's `case_different_data` (which
also checks them against the single-device torch optimizers there); rank 0 returns the start,
the mean gradients of every step and its final parameters, and the JAX optimizer replays the
means here. `rank_groups` is the session's pool of ranks (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tests.dist.common import close, mean_grad_param_tolerance
from tests.dist.test_sharded_equals_single_device import (
    ADAMW_DIFF_KW,
    MUON_DIFF_KW,
    adam_tolerance,
    case_different_data,
)


def test_dist_muon_different_data_matches_jax_reference(rank_groups):
    """The same run at N=3 against jax_reference.muon fed the fp32 mean gradients."""
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from jax_reference.muon import muon as jax_muon

    DIFF_KW = MUON_DIFF_KW
    n, steps = 3, 3
    out = rank_groups(n).run(case_different_data, "muon", steps)[0]
    kw = {k: v for k, v in DIFF_KW.items() if k not in ("lr", "ns_dtype")}
    tx = jax_muon(DIFF_KW["lr"], **kw, ns_steps=5, orthogonalizer="newton_schulz",
                  shape_scale="max_ratio", ns_dtype=jnp.float32)
    jp = [jnp.asarray(p.numpy()) for p in out["start"]]
    state = tx.init(jp)
    for gs in out["means"]:
        updates, state = tx.update([jnp.asarray(g.numpy()) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
    for p, q in zip(out["final"], jp):
        # tolerance: the mean-gradient bound plus torch-vs-JAX fp32 NS rounding (same order)
        tol = 2 * mean_grad_param_tolerance(p.shape, n, steps, DIFF_KW["lr"], normuon=True)
        good, err = close(p, torch.from_numpy(jnp.asarray(q).__array__().copy()), tol)
        assert good, f"{tuple(p.shape)}: |DistMuon - jax muon| = {err:.3g} > {tol:.3g}"


def test_dist_adamw_different_data_matches_jax_reference(rank_groups):
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from jax_reference.adamw import adamw as jax_adamw

    DIFF_KW = ADAMW_DIFF_KW
    n, steps = 3, 3
    out = rank_groups(n).run(case_different_data, "adamw", steps)[0]
    b1, b2 = DIFF_KW["betas"]
    tx = jax_adamw(DIFF_KW["lr"], b1=b1, b2=b2, eps=DIFF_KW["eps"], weight_decay=DIFF_KW["weight_decay"])
    jp = [jnp.asarray(p.numpy()) for p in out["start"]]
    state = tx.init(jp)
    for gs in out["means"]:
        updates, state = tx.update([jnp.asarray(g.numpy()) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
    # plus optax's fp32 bias correction (jax_reference/adamw.py: ~6e-7 relative for b2 = 0.95)
    tol = adam_tolerance(n, steps, DIFF_KW["lr"]) + steps * DIFF_KW["lr"] * 1e-6
    for p, q in zip(out["final"], jp):
        good, err = close(p, torch.tensor(jnp.asarray(q).tolist()), tol)
        assert good, f"{tuple(p.shape)}: |DistAdamW - jax adamw| = {err:.3g} > {tol:.3g}"
