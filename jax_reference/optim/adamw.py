"""AdamW with torch.optim.AdamW semantics (.specs/muon_math.md §8), built from optax pieces.

optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate) gives
the update −lr·(m̂/(√v̂ + ε) + wd·P) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), t = 1
on the first step: the same as §8 eq. (13) in real arithmetic (ε after the
bias correction of v, decay on the pre-update P with the current lr). The two
differ only by float rounding, the largest part being optax's float32 bias
correction: 1 − β₂ᵗ is computed in float32 (torch: in Python fp64), so for
β₂ = 0.999 and small t it is off by up to ~3e-5 relative and the update by
~1e-5 relative (~6e-7 for nanochat's β₂ = 0.95).

What the plain chain does NOT give is float32 moments for bf16 params
(scale_by_adam keeps nu in the param dtype), so it runs inside
jax_reference.optim.precision.in_float32 (§2).
"""

import optax

from jax_reference.optim.nonfinite import guard_nonfinite
from jax_reference.optim.precision import in_float32

__all__ = ["adamw", "in_float32"]


def adamw(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nonfinite: str = "raise",
) -> optax.GradientTransformationExtraArgs:
    """torch-style AdamW (§8); learning_rate is a float or a schedule of the step count (0 first).

    nonfinite: "raise" or "skip" (§9, jax_reference.optim.nonfinite).
    """
    core = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    return guard_nonfinite(in_float32(core), nonfinite)
