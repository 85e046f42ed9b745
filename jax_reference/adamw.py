"""AdamW with torch.optim.AdamW semantics, built from optax pieces.

torch (https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html,
Loshchilov & Hutter, https://arxiv.org/abs/1711.05101), t = 1 on the first step:

    P ← P·(1 − lr·wd)
    m ← b1 m + (1−b1) g,   v ← b2 v + (1−b2) g²
    P ← P − lr · (m / (1−b1^t)) / (sqrt(v)/sqrt(1−b2^t) + eps)

optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate) gives
the update −lr·(m̂/(sqrt(v̂) + eps) + wd·P) with m̂ = m/(1−b1^t),
v̂ = v/(1−b2^t) and t = 1 on the first step: sqrt(v̂) = sqrt(v)/sqrt(1−b2^t)
exactly in real arithmetic, so eps sits in the same place as in torch, and the
decay term uses the pre-update P and the current lr, as torch does. The two
differ only by float rounding, the largest part being optax's f32 bias
correction: 1 − b2^t is computed in float32 (torch: in Python fp64), so for
b2 = 0.999 and small t it is off by up to ~3e-5 relative and the update by
~1e-5 relative (~6e-7 for nanochat's b2 = 0.95).

What the plain chain does NOT give is float32 moments for bf16 params
(scale_by_adam keeps nu in the param dtype), so the chain runs inside a
wrapper that feeds it float32 params/gradients and casts the update back to
the param dtype.
"""

import jax
import jax.numpy as jnp
import optax

from jax_reference import _finite


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on float32 params/updates (so its state is float32)."""

    def init_fn(params):
        return inner.init(_f32(params))

    def update_fn(updates, state, params=None):
        new, state = inner.update(_f32(updates), state, None if params is None else _f32(params))
        like = updates if params is None else params
        return jax.tree.map(lambda u, x: u.astype(jnp.result_type(x)), new, like), state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nonfinite: str = "raise",
) -> optax.GradientTransformationExtraArgs:
    """torch-style AdamW; learning_rate is a float or a schedule of the step count (0 first).

    nonfinite: "raise" or "skip", see jax_reference._finite.
    """
    core = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _finite.guard_nonfinite(in_float32(core), nonfinite)
