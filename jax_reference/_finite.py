"""Non-finite gradient policy shared by muon, adamw and the hybrid optimizer.

nonfinite="raise": a NaN/inf in any gradient leaf is an error naming the leaf.
  With concrete arrays (eager calls) it is a ValueError raised before the inner
  transformation runs, so no state is produced. Under tracing (jit, scan, ...)
  Python cannot look at the values, so the check is staged with
  `jax.experimental.checkify.check`: wrap the update as
  `checkify.checkify(jax.jit(tx.update))` and `err.throw()` reports the leaf.
  A plain `jax.jit(tx.update)` of a "raise" transformation is rejected by JAX
  at lowering time ("Cannot abstractly evaluate a checkify.check which was not
  functionalized"): under jit pick checkify or nonfinite="skip" explicitly, the
  reference never lets a NaN through silently.
nonfinite="skip": if any gradient is non-finite the whole step is a no-op:
  zero updates and the previous state returned unchanged (step counts are not
  incremented). Jit-compatible: the inner step runs on zeroed gradients (so
  nothing inside sees NaN) and jnp.where selects the old state.
"""

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

NONFINITE_MODES = ("raise", "skip")


def check_mode(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    return nonfinite


def raise_if_nonfinite(grads) -> None:
    """ValueError (concrete) or checkify.check (traced) per gradient leaf."""
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ok = jnp.all(jnp.isfinite(g))
        msg = f"non-finite gradient at {jax.tree_util.keystr(path)} (shape {tuple(jnp.shape(g))})"
        if isinstance(ok, jax.core.Tracer):
            checkify.check(ok, msg)
        elif not bool(ok):
            raise ValueError(msg)


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_nonfinite(inner: optax.GradientTransformation, nonfinite: str) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` with the "raise" or "skip" policy described above."""
    check_mode(nonfinite)
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        if nonfinite == "raise":
            raise_if_nonfinite(updates)
            return inner.update(updates, state, params, **extra_args)
        ok = all_finite(updates)
        safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), updates)
        new_updates, new_state = inner.update(safe, state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
