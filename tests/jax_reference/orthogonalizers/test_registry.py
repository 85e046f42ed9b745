"""jax_reference.orthogonalizers.registry: the named orthogonalizers and their schedules (spec §1), each
registered function's shapes, dtypes and bad inputs, and its tall / batched / jitted agreement."""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_reference.optim.muon import muon
from jax_reference.orthogonalizers.registry import ORTHOGONALIZER_SCHEDULES, ORTHOGONALIZERS, resolve_orthogonalizer
from jax_reference.orthogonalizers.schedules import SCHEDULES
from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import matrix, rel_err
from tests.rounding_bounds import FP32_U, gram_condition, ns_condition, tolerance

NAMES = sorted(ORTHOGONALIZERS)


def default_steps(name):
    return SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]].default_steps


def fp32_tolerance(name):
    """2·u·κ of the named orthogonalizer at its default steps (rounding_bounds.py)."""
    s = SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]]
    triples = s.triples(s.default_steps)
    kappa = ns_condition(triples, 1 / s.norm_scale)
    if name == "gram_newton_schulz":
        kappa += gram_condition(triples, (2,), 1 / s.norm_scale)
    return tolerance(FP32_U, kappa)


def orth(name, X, dtype=jnp.float32):
    return ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=1e-7, compute_dtype=dtype)


def test_registry_names_and_schedules():
    assert tuple(ORTHOGONALIZERS) == ("newton_schulz", "polar_express", "gram_newton_schulz", "aol", "cans",
                                      "cubic", "deepseek_v4")
    assert set(ORTHOGONALIZER_SCHEDULES) == set(ORTHOGONALIZERS)
    assert ORTHOGONALIZER_SCHEDULES["gram_newton_schulz"] == "polar_express"


@pytest.mark.parametrize("name", NAMES)
def test_named_orthogonalizers_dispatch(name):
    # μ = 0, lr = 1, wide matrix (scale 1): the update is exactly −orth(G).
    G = matrix("gaussian", 1, 8, 32)
    tx = muon(1.0, momentum=0.0, ns_steps=default_steps(name), orthogonalizer=name)
    updates, _ = tx.update({"w": G}, tx.init({"w": G}), {"w": G})
    expected = ORTHOGONALIZERS[name](G, steps=default_steps(name), eps=1e-7, compute_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(-updates["w"], expected)  # same code path: bitwise


@pytest.mark.parametrize("name, steps, message", [
    ("cubic", 4, r"orthogonalizer 'cubic': ns_steps: schedule 'cubic' supports steps = 5 only, got steps=4"),
    ("deepseek_v4", 5, r"'deepseek_v4'.*steps >= 10"),
    ("aol", 6, r"'aol'.*1 <= steps <= 5"),
    ("gram_newton_schulz", 0, r"'gram_newton_schulz'.*steps >= 1"),
])
def test_unsupported_ns_steps_raise_when_built(name, steps, message):
    with pytest.raises(ValueError, match=message):
        muon(0.02, orthogonalizer=name, ns_steps=steps)
    with pytest.raises(ValueError, match=message):
        resolve_orthogonalizer(name, steps, jnp.float32)


def test_unknown_orthogonalizer_lists_every_name():
    with pytest.raises(ValueError, match="'newton_schulz', 'polar_express', 'gram_newton_schulz', 'aol', 'cans', "
                                         "'cubic', 'deepseek_v4'"):
        muon(0.02, orthogonalizer="svd")


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_zero_and_bad_inputs(name):
    G = jnp.asarray(matrix("gaussian", 2, 2 * 8, 32).reshape(2, 8, 32), jnp.bfloat16)
    out = orth(name, G, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 32)
    np.testing.assert_array_equal(orth(name, np.zeros((8, 32), np.float32)), 0.0)  # zero maps to zero
    for x, message in BAD_INPUTS.values():
        with pytest.raises(ValueError, match=message):
            orth(name, jnp.asarray(x))


@pytest.mark.parametrize("name", NAMES)
def test_tall_batch_and_jit_agree(name):
    # The same math each way in other summation orders: each within 2·u·κ of the exact result, so
    # within twice that of each other. A missing transpose-back or a mixed-up batch is O(1).
    G = matrix("gaussian", 9, 2 * 8, 32).reshape(2, 8, 32)
    base = np.asarray(orth(name, G), np.float64)
    tol = 2 * fp32_tolerance(name)
    tall = np.asarray(orth(name, np.swapaxes(G, -1, -2)))
    assert rel_err(np.swapaxes(tall, -1, -2), base) <= tol
    looped = np.stack([np.asarray(orth(name, G[i])) for i in range(2)])
    assert rel_err(looped, base) <= tol
    jitted = jax.jit(functools.partial(ORTHOGONALIZERS[name], steps=default_steps(name), eps=1e-7,
                                       compute_dtype=jnp.float32))(G)
    assert rel_err(jitted, base) <= tol
    if name == "aol":  # a square matrix is "wide": AOL scales its rows, its transpose's columns (spec §4)
        S = G[0, :, :8]
        assert rel_err(np.asarray(orth(name, S.T)).T, np.asarray(orth(name, S), np.float64)) > 1e-3
