"""jax_reference.optim.precision.in_float32: the inner transform sees float32, the update comes back in
the param dtype (.specs/muon_math.md §2)."""

import jax.numpy as jnp
import numpy as np
import optax

from jax_reference.optim.precision import in_float32


def recording(seen: list) -> optax.GradientTransformation:
    """An inner transform that records the dtypes it is given and doubles the update."""
    def init_fn(params):
        seen.append(("init", params.dtype))
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        seen.append(("update", updates.dtype, None if params is None else params.dtype))
        return updates * 2, state

    return optax.GradientTransformation(init_fn, update_fn)


def test_inner_sees_float32_and_the_update_returns_in_the_param_dtype():
    seen = []
    tx = in_float32(recording(seen))
    p = jnp.asarray([1.0, -2.5, 3.0], jnp.bfloat16)
    g = jnp.asarray([0.5, 0.25, -1.0], jnp.bfloat16)
    state = tx.init(p)
    u, _ = tx.update(g, state, p)
    assert seen == [("init", jnp.float32), ("update", jnp.float32, jnp.float32)]
    assert u.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(u, np.float32), [1.0, 0.5, -2.0])  # exact in bf16


def test_without_params_the_update_takes_the_gradient_dtype():
    seen = []
    tx = in_float32(recording(seen))
    g = jnp.asarray([0.5, 0.25], jnp.bfloat16)
    u, _ = tx.update(g, tx.init(g), None)
    assert u.dtype == jnp.bfloat16 and seen[-1][1] == jnp.float32
