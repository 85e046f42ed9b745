"""Muon trajectories in both frameworks in lockstep, shared by the trajectory parity tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import torch


def trajectory_inputs(case: dict) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """float32 parameters of case["shapes"] and case["steps"] gradient sets, from case["seed"]."""
    rng = np.random.default_rng(case["seed"])
    params = [rng.standard_normal(s).astype(np.float32) for s in case["shapes"]]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in case["shapes"]]
             for _ in range(case["steps"])]
    return params, grads


def lockstep(topt: torch.optim.Optimizer, tparams: list, tx: optax.GradientTransformation,
             params: list[np.ndarray], grads: list[list[np.ndarray]]):
    """Step the torch optimizer (over `tparams`) and the optax one from `params` on the same
    gradients; after each step yield (step index t, the JAX parameters, the optax state)."""
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)
    for t, gs in enumerate(grads):
        for p, g in zip(tparams, gs):
            p.grad = torch.from_numpy(g.copy())  # a copy: the frameworks must not share memory
        topt.step()
        updates, state = tx.update([jnp.asarray(g) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
        yield t, jp, state
