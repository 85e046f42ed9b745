"""The named orthogonalizers (.specs/orthogonalizers.md §1): one name per method in both frameworks,
each with the coefficient schedule that decides which step counts it accepts, and the binding of a
name (or a callable f(X, *, steps, eps, compute_dtype)) to Muon's settings."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from torch_impl.orthogonalizers.aol import aol
from torch_impl.orthogonalizers.gram_newton_schulz import gram_newton_schulz
from torch_impl.orthogonalizers.newton_schulz import newton_schulz, polar_express
from torch_impl.orthogonalizers.schedules import SCHEDULES, cans, cubic, deepseek_v4

# The named orthogonalizers (.specs/orthogonalizers.md §1), all called as f(X, *, steps, eps,
# compute_dtype). Muon checks gradients for NaN/inf once per step, so they skip their own
# per-call check (a host sync on GPU).
ORTHOGONALIZERS = {name: functools.partial(fn, check_finite=False) for name, fn in (
    ("newton_schulz", newton_schulz),
    ("polar_express", polar_express),
    ("gram_newton_schulz", gram_newton_schulz),  # Polar Express schedule and 1.01 norm scale by default
    ("aol", aol),
    ("cans", cans),
    ("cubic", cubic),
    ("deepseek_v4", deepseek_v4),
)}
# The schedule (schedules.SCHEDULES) each named orthogonalizer runs: it decides the step counts it accepts.
ORTHOGONALIZER_SCHEDULES = {
    "newton_schulz": "newton_schulz",
    "polar_express": "polar_express",
    "gram_newton_schulz": "polar_express",
    "aol": "aol",
    "cans": "cans",
    "cubic": "cubic",
    "deepseek_v4": "deepseek_v4",
}
NS_EPS = 1e-7  # added to the Frobenius norm so a zero matrix maps to zero (newton_schulz's default)


def default_steps(orthogonalizer: str | Callable) -> int:
    """The step count a named orthogonalizer's schedule is published with (5 for a callable)."""
    if isinstance(orthogonalizer, str) and orthogonalizer in ORTHOGONALIZER_SCHEDULES:
        return SCHEDULES[ORTHOGONALIZER_SCHEDULES[orthogonalizer]].default_steps
    return 5


def check_orthogonalizer(orthogonalizer: str | Callable, ns_steps: int, ns_dtype: torch.dtype) -> None:
    """ValueError for an unknown name, a non-callable, or a callable that cannot be called as
    f(X, *, steps, eps, compute_dtype). Muon runs it at construction (collectively): at the
    first step only the ranks that own matrices would call it, and the others would wait."""
    orth = resolve_orthogonalizer(orthogonalizer, ns_steps, ns_dtype)  # names, step counts, non-callables
    if isinstance(orthogonalizer, str):
        # A trial call on a 1×2 zero matrix raises what only a call can tell (gram_newton_schulz's
        # float16 range check), here on every rank instead of at the first step on the owners only.
        orth(torch.zeros(1, 2))
        return
    try:
        inspect.signature(orthogonalizer).bind(None, steps=ns_steps, eps=NS_EPS, compute_dtype=ns_dtype)
    except TypeError as e:
        raise ValueError(f"orthogonalizer {orthogonalizer!r} must accept f(X, *, steps, eps, "
                         f"compute_dtype): {e}") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): trust the caller


def resolve_orthogonalizer(
    orthogonalizer: str | Callable, ns_steps: int, ns_dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Bind a name, or a callable f(X, *, steps, eps, compute_dtype) (the same signature as
    jax_reference's; see check_orthogonalizer), to Muon's settings."""
    if isinstance(orthogonalizer, str):
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; "
                             f"valid: {', '.join(ORTHOGONALIZERS)} or a callable")
        try:
            SCHEDULES[ORTHOGONALIZER_SCHEDULES[orthogonalizer]].check_steps(ns_steps)
        except ValueError as e:
            raise ValueError(f"orthogonalizer {orthogonalizer!r}: ns_steps: {e}") from None
        orthogonalizer = ORTHOGONALIZERS[orthogonalizer]
    elif not callable(orthogonalizer):
        raise ValueError(f"orthogonalizer must be a name or a callable, got {orthogonalizer!r}")
    fn = orthogonalizer
    return lambda X: fn(X, steps=ns_steps, eps=NS_EPS, compute_dtype=ns_dtype)
