"""Non-finite gradient policy shared by the optimizers.

A NaN/inf gradient would silently poison momentum and weights. The optimizers check all
gradients at once (one host sync), then either raise naming the parameters before
anything is written ("raise", the default) or skip the whole step ("skip")."""

from __future__ import annotations

import torch

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf; the message names the parameters."""


def check_policy(policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names whose tensor holds NaN or inf."""
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [n for (n, _), ok in zip(named, flags) if not ok]


def gradients_ok(policy: str, bad: list[str]) -> bool:
    """Apply the policy to the names of bad gradients; False means: skip this step."""
    if not bad:
        return True
    if policy == "raise":
        raise NonFiniteGradientError(f"non-finite gradient in {', '.join(bad)}; nothing was "
                                 "updated (pass nonfinite='skip' to skip such steps)")
    return False


def named_params(group: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, param) pairs of an optimizer group; unnamed params are named by position."""
    names = group.get("param_names") or [
        f"param[{i}] {tuple(p.shape)}" for i, p in enumerate(group["params"])]
    return list(zip(names, group["params"]))


def named_grads(param_groups: list[dict]) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.grad) for g in param_groups for n, p in named_params(g) if p.grad is not None]
