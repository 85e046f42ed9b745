"""The non-finite gradient policy (.specs/muon_math.md): one flag, applied once per step.

A NaN/inf gradient would silently poison momentum and weights. The optimizers gather one flag
per parameter in a single pass (one all_reduce across ranks: distributed.grad_flags), then
either raise naming the parameters before anything is written ("raise", the default) or skip
the whole step on every rank ("skip")."""

from __future__ import annotations

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf; the message names the parameters (`names`)."""

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = names or []

    def with_hint(self, how_to_skip: str) -> str:
        """The message with the caller's way to skip such steps (a flag, an argument)."""
        return nonfinite_message(self.names, how_to_skip) if self.names else str(self)


def nonfinite_message(names: list[str], how_to_skip: str) -> str:
    return f"non-finite gradient in {', '.join(names)}; nothing was updated (pass {how_to_skip} to skip such steps)"


def check_policy(policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def gradients_ok(policy: str, bad: list[str]) -> bool:
    """Apply the policy to the names of bad gradients; False means: skip this step."""
    if not bad:
        return True
    if policy == "raise":
        raise NonFiniteGradientError(nonfinite_message(bad, "nonfinite='skip'"), bad)
    return False
