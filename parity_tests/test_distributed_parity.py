"""DistMuon / DistAdamW in 3 spawned gloo ranks (different data per rank) against the JAX
reference fed the fp32 mean gradients.

The runs are tests/dist/test_sharded_equals_single_device.py's `case_different_data` (which
also checks them against the single-device torch optimizers there); rank 0 returns the start,
the mean gradients of every step and its final parameters, and the JAX optimizer replays the
means here. `rank_groups` is the session's pool of ranks (conftest.py)."""

from __future__ import annotations

import numpy as np
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
    """The same run at N=3 against jax_reference.optim.muon fed the fp32 mean gradients."""
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from jax_reference.optim.muon import muon as jax_muon

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
    from jax_reference.optim.adamw import adamw as jax_adamw

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
    # plus optax's fp32 bias correction (jax_reference/optim/adamw.py: ~6e-7 relative for b2 = 0.95)
    tol = adam_tolerance(n, steps, DIFF_KW["lr"]) + steps * DIFF_KW["lr"] * 1e-6
    for p, q in zip(out["final"], jp):
        good, err = close(p, torch.tensor(jnp.asarray(q).tolist()), tol)
        assert good, f"{tuple(p.shape)}: |DistAdamW - jax adamw| = {err:.3g} > {tol:.3g}"


# ---- the sharded step in both frameworks: torch FSDP2 vs jax_reference.sharding.sharded ---------------------
# The same fp32 matrices, sharded by rows over N ranks / devices (dims 0 not divisible by N and
# smaller than N, a 32×1, a 4-D kernel), the same exact gradients: torch's Muon on FSDP2
# DTensors (gloo ranks) against jax_reference's sharded_muon on a Mesh of N CPU devices.

SHARDED_SPECS = [((5, 16), torch.float32), ((5, 16), torch.float32), ((5, 16), torch.float32),
                 ((1, 8), torch.float32), ((32, 1), torch.float32), ((12, 10), torch.float32),
                 ((6, 3, 2, 2), torch.float32)]
SHARDED_KW = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, cautious_weight_decay=True,
                  normuon_beta2=0.95, shape_scale="max_ratio")


def case_fsdp2_muon_trajectory(steps):
    from tests.dist.test_fsdp2 import step_pair
    from torch_impl.optim import DistMuon, Muon
    params, _, _, _ = step_pair(SHARDED_SPECS, DistMuon, Muon, dict(SHARDED_KW, ns_dtype=torch.float32), steps, 31)
    return [p.full_tensor().detach() for p in params]


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp2_muon_matches_jax_sharded_step(rank_groups, n):
    jax = pytest.importorskip("jax")
    jnp, optax = pytest.importorskip("jax.numpy"), pytest.importorskip("optax")
    from jax_reference.optim.muon import sharded_muon
    from jax_reference.sharding.sharded import row_mesh, shard_rows, unshard_rows
    from parity_tests.test_muon_parity import muon_tolerance
    from tests.dist.common import exact_randn, make_params

    if jax.device_count() < n:
        pytest.skip(f"JAX sees {jax.device_count()} devices (conftest.py sets XLA_FLAGS for 4)")
    steps = 3
    torch_final = rank_groups(n).run(case_fsdp2_muon_trajectory, steps)[0]
    mesh = row_mesh(n)
    kw = {k: v for k, v in SHARDED_KW.items() if k != "lr"}
    tx = sharded_muon(mesh, SHARDED_KW["lr"], ns_dtype=jnp.float32, nonfinite="skip", **kw)
    stored = shard_rows([jnp.asarray(p.detach().numpy()) for p in make_params(SHARDED_SPECS)], mesh)
    state = tx.init(stored)
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = shard_rows([jnp.asarray(exact_randn(s, 31, t, i).numpy()) for i, (s, _) in enumerate(SHARDED_SPECS)],
                           mesh)
        u, state = update(grads, state, stored)
        stored = optax.apply_updates(stored, u)
    for p, q in zip(torch_final, unshard_rows(stored)):
        # the torch-vs-JAX fp32 trajectory bound of test_muon_parity.py (NS rounding amplified by
        # Π|a_k|, ×3 for NorMuon's rescaling, summed over the steps): sharding adds no error of
        # its own, since both sharded steps equal their single-device steps (tests/dist,
        # tests/jax_reference/sharding/test_sharded.py)
        tol = muon_tolerance(dict(steps=steps, orth="newton_schulz", lr=SHARDED_KW["lr"], scale="max_ratio",
                                  normuon=0.95), tuple(p.shape))
        np.testing.assert_allclose(p.numpy(), np.asarray(q), rtol=0, atol=tol, err_msg=str(tuple(p.shape)))
