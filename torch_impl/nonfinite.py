"""The non-finite gradient policy (.specs/muon_math.md): one flag, applied once per step.

A NaN/inf gradient would silently poison momentum and weights. The optimizers gather one flag
per parameter in a single pass (one all_reduce across ranks: distributed.grad_flags), then
either raise naming the parameters before anything is written ("raise", the default) or skip
the whole step on every rank ("skip")."""

from __future__ import annotations

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf; the message names the parameters."""


def check_policy(policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def gradients_ok(policy: str, bad: list[str]) -> bool:
    """Apply the policy to the names of bad gradients; False means: skip this step."""
    if not bad:
        return True
    if policy == "raise":
        raise NonFiniteGradientError(f"non-finite gradient in {', '.join(bad)}; nothing was "
                                 "updated (pass nonfinite='skip' to skip such steps)")
    return False
