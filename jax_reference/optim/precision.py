"""float32 math whatever the param dtype (.specs/muon_math.md §2).

`in_float32(inner)` feeds `inner` float32 params and updates (so the state it
creates is float32) and casts each update back to its param's dtype once, at
the end. optax.apply_updates then adds that update in the param dtype.
"""

import jax
import jax.numpy as jnp
import optax


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on float32 params/updates; the update comes back in the param dtype."""

    def init_fn(params):
        return inner.init(_f32(params))

    def update_fn(updates, state, params=None):
        new, state = inner.update(_f32(updates), state, None if params is None else _f32(params))
        like = updates if params is None else params
        return jax.tree.map(lambda u, x: u.astype(jnp.result_type(x)), new, like), state

    return optax.GradientTransformation(init_fn, update_fn)
