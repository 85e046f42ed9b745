"""The non-finite gradient policy shared by muon, adamw and the hybrid optimizer.

See .specs/muon_math.md §9. "raise": a NaN/inf gradient is an error naming the
leaf and nothing is updated; "skip": the whole step is a no-op (zero updates,
state and step counts unchanged).

JAX mechanics of "raise": with concrete arrays (eager calls) the error is a
NonFiniteGradientError (a ValueError) raised before the inner transformation
runs. Under tracing (jit, scan, ...) Python cannot look at the values, so the
check is staged with `jax.experimental.checkify.check`: wrap the update as
`checkify.checkify(jax.jit(tx.update))` and `err.throw()` reports the leaf. A
plain `jax.jit(tx.update)` of a "raise" transformation is rejected by JAX at
lowering time ("Cannot abstractly evaluate a checkify.check which was not
functionalized"): under jit pick checkify or nonfinite="skip" explicitly; the
reference never lets a NaN through silently.

JAX mechanics of "skip": jit-compatible. The inner step runs on zeroed
gradients (so nothing inside sees NaN) and jnp.where selects the old state.
"""

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf; the message names the leaf."""


def check_policy(policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def raise_if_nonfinite(grads) -> None:
    """NonFiniteGradientError (concrete) or checkify.check (traced) per gradient leaf."""

    def check(path, g):
        ok = jnp.all(jnp.isfinite(g))
        msg = f"non-finite gradient at {jax.tree_util.keystr(path)} (shape {tuple(jnp.shape(g))})"
        if isinstance(ok, jax.core.Tracer):
            checkify.check(ok, msg)
        elif not bool(ok):
            raise NonFiniteGradientError(msg)

    jax.tree_util.tree_map_with_path(check, grads)


def all_finite(tree) -> jax.Array:
    """True iff every leaf of `tree` is free of NaN and inf (a 0-d bool array)."""
    flags = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)
    return jax.tree.reduce(jnp.logical_and, flags, jnp.asarray(True))


def guard_nonfinite(inner: optax.GradientTransformation, policy: str) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` with the "raise" or "skip" policy (.specs/muon_math.md §9)."""
    check_policy(policy)
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        if policy == "raise":
            raise_if_nonfinite(updates)
            return inner.update(updates, state, params, **extra_args)
        ok = all_finite(updates)
        safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), updates)
        new_updates, new_state = inner.update(safe, state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
