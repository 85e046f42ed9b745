"""The named orthogonalizers (.specs/orthogonalizers.md §1): one name per method in both frameworks,
each with the coefficient schedule that decides which step counts it accepts, and the binding of a
name (or a callable f(X, *, steps, eps, compute_dtype)) to Muon's settings (orth of
.specs/muon_math.md §4)."""

import functools
from collections.abc import Callable
from typing import Any

import jax

from jax_reference.orthogonalizers.aol import aol
from jax_reference.orthogonalizers.gram_newton_schulz import gram_newton_schulz
from jax_reference.orthogonalizers.newton_schulz import NS5_COEFFS, newton_schulz, polar_express
from jax_reference.orthogonalizers.schedules import SCHEDULES, cans, cubic, deepseek_v4

# The named orthogonalizers (.specs/orthogonalizers.md §1), all called as f(X, *, steps, eps, compute_dtype).
ORTHOGONALIZERS = {
    "newton_schulz": functools.partial(newton_schulz, coeffs=NS5_COEFFS),
    "polar_express": polar_express,
    "gram_newton_schulz": gram_newton_schulz,  # Polar Express schedule and 1.01 norm scale by default
    "aol": aol,
    "cans": cans,
    "cubic": cubic,
    "deepseek_v4": deepseek_v4,
}
# The schedule (SCHEDULES) each named orthogonalizer runs: it decides the step counts it accepts.
ORTHOGONALIZER_SCHEDULES = {
    "newton_schulz": "newton_schulz",
    "polar_express": "polar_express",
    "gram_newton_schulz": "polar_express",
    "aol": "aol",
    "cans": "cans",
    "cubic": "cubic",
    "deepseek_v4": "deepseek_v4",
}


def resolve_orthogonalizer(
    orthogonalizer: str | Callable[..., Any], ns_steps: int, ns_dtype, eps: float = 1e-7
) -> Callable[[jax.Array], jax.Array]:
    """orth of §4 eq. (3): X ↦ f(X, steps=ns_steps, eps=eps, compute_dtype=ns_dtype).

    `orthogonalizer` is a name of ORTHOGONALIZERS ("newton_schulz" with the NS5 coefficients,
    "polar_express", "gram_newton_schulz", "aol", "cans", "cubic", "deepseek_v4") or a callable
    with that keyword signature. A name's ns_steps is checked now against its schedule
    (ValueError naming the step counts it supports, e.g. "cubic": 5 only).
    """
    if callable(orthogonalizer):
        fn = orthogonalizer
    elif orthogonalizer in ORTHOGONALIZERS:
        fn = ORTHOGONALIZERS[orthogonalizer]
        try:
            SCHEDULES[ORTHOGONALIZER_SCHEDULES[orthogonalizer]].check_steps(ns_steps)
        except ValueError as e:
            raise ValueError(f"orthogonalizer {orthogonalizer!r}: ns_steps: {e}") from None
    else:
        raise ValueError(
            f"orthogonalizer must be a callable or one of {tuple(ORTHOGONALIZERS)}, got {orthogonalizer!r}"
        )
    return functools.partial(fn, steps=ns_steps, eps=eps, compute_dtype=ns_dtype)
