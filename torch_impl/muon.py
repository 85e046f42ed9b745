"""The math of one Muon step on a stack of same-shape matrices.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) with nanochat's
conventions. For a stack of K matrices P (rows × cols) with gradients G, momentum μ:

    M  ← lerp(M, G, 1 − μ)                 EMA momentum buffer
    U  = lerp(G, M, μ)  (Nesterov)  or  M
    O  = orth(U)                           Newton-Schulz / Polar Express ≈ polar factor
    [NorMuon, β₂ set (https://arxiv.org/abs/2510.05491): per-row (or per-column, along
     the larger side) second moment v ← lerp(v, mean(O², smaller side), 1 − β₂),
     O ← O/√v rescaled to keep ‖O‖_F]
    P  ← P·(1 − lr·wd·mask) − lr·scale·O   mask = 1, or (O·P ≥ 0) for cautious decay

with scale = max(1, rows/cols)^½ ("max_ratio", nanochat) or 0.2·√max(rows, cols)
("match_rms_adamw", Moonlight https://arxiv.org/abs/2502.16982). Weight decay is
decoupled and not shape-scaled, as in torch.optim.Muon.

`muon_step` is the only place this math lives: `Muon` calls it on every stack of a
parameter group, `DistMuon` on the slice of each stack its rank owns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_impl.finite import check_policy, named_params
from torch_impl.optimizer_base import StepOptimizer
from torch_impl.orthogonalize import frobenius_norm, newton_schulz, polar_express

SHAPE_SCALES = ("max_ratio", "match_rms_adamw")


def shape_scale(rows: int, cols: int, rule: str) -> float:
    """Update multiplier that makes the orthogonalized update's size shape-aware."""
    if rule == "max_ratio":
        return max(1.0, rows / cols) ** 0.5
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown shape_scale {rule!r}; valid: {', '.join(SHAPE_SCALES)}")


def as_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """N-D parameters (conv kernels, ...) are orthogonalized as (shape[0], prod(rest))."""
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters with ≥ 2 dims, got shape {tuple(shape)}; "
                         "send 0-D/1-D parameters to AdamW")
    return shape[0], math.prod(shape[1:])


def normuon_state_shape(rows: int, cols: int) -> tuple[int, int]:
    """NorMuon keeps one second moment per row of the larger side: reduce the smaller one."""
    return (rows, 1) if rows >= cols else (1, cols)


@dataclass(frozen=True)
class MuonHyper:
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    cautious_weight_decay: bool
    normuon_beta2: float | None
    shape_scale: str
    orthogonalize: Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def muon_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor | None,
    hp: MuonHyper,
) -> None:
    """One Muon step, in place, on fp32 stacks of shape (K, rows, cols).

    `params`, `momentum_buf` and `second_moment` are updated in place; `grads` is read only.
    `second_moment` has shape (K, *normuon_state_shape(rows, cols)) when NorMuon is on."""
    rows, cols = params.shape[-2:]
    momentum_buf.lerp_(grads, 1 - hp.momentum)
    update = grads.lerp(momentum_buf, hp.momentum) if hp.nesterov else momentum_buf
    O = hp.orthogonalize(update).to(params.dtype)
    if hp.normuon_beta2 is not None:
        reduce_dim = -1 if rows >= cols else -2
        second_moment.lerp_(O.square().mean(dim=reduce_dim, keepdim=True), 1 - hp.normuon_beta2)
        scaled = O * second_moment.clamp_min(1e-10).rsqrt()
        O = scaled * (frobenius_norm(O) / frobenius_norm(scaled).clamp_min(1e-10))
    if hp.weight_decay != 0:
        decay = hp.lr * hp.weight_decay
        if hp.cautious_weight_decay:
            # decay only where the step and the weight agree in sign (exact zeros decay too)
            params.sub_(params * (O * params >= 0), alpha=decay)
        else:
            params.mul_(1 - decay)
    params.add_(O, alpha=-hp.lr * shape_scale(rows, cols, hp.shape_scale))


ORTHOGONALIZERS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


def resolve_orthogonalizer(
    orthogonalizer: str | Callable, ns_steps: int, ns_dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Bind a name (or a callable with newton_schulz's signature) to Muon's settings."""
    if isinstance(orthogonalizer, str):
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; "
                             f"valid: {', '.join(ORTHOGONALIZERS)} or a callable")
        orthogonalizer = ORTHOGONALIZERS[orthogonalizer]
    elif not callable(orthogonalizer):
        raise ValueError(f"orthogonalizer must be a name or a callable, got {orthogonalizer!r}")
    fn = orthogonalizer
    # Muon checks gradients for NaN/inf once per step; skip the per-call host sync.
    return lambda X: fn(X, steps=ns_steps, compute_dtype=ns_dtype, check_finite=False)


class Muon(StepOptimizer):
    """Single-device Muon; see the module docstring for the math.

    Parameters of one group with the same (matrix) shape, dtype and device are stacked so
    one batched orthogonalizer call serves them all. Work happens in fp32 copies; bf16
    parameters are rounded once when written back. Gradients are never modified.

    Accepts `model.named_parameters()` so error messages can name parameters.
    `nonfinite="raise"` (default) raises before anything is written when a gradient has
    NaN/inf; `"skip"` skips the whole step instead (state untouched, returns False)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
                 orthogonalizer="newton_schulz", weight_decay=0.0, cautious_weight_decay=False,
                 normuon_beta2=None, shape_scale="max_ratio", ns_dtype=torch.bfloat16,
                 nonfinite="raise"):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr ≥ 0, weight_decay ≥ 0, 0 ≤ momentum < 1; got "
                             f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        if normuon_beta2 is not None and not 0 <= normuon_beta2 < 1:
            raise ValueError(f"normuon_beta2 must be in [0, 1) or None, got {normuon_beta2}")
        if shape_scale not in SHAPE_SCALES:
            raise ValueError(f"unknown shape_scale {shape_scale!r}; valid: {', '.join(SHAPE_SCALES)}")
        resolve_orthogonalizer(orthogonalizer, ns_steps, ns_dtype)  # validate early
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        orthogonalizer=orthogonalizer, weight_decay=weight_decay,
                        cautious_weight_decay=cautious_weight_decay, normuon_beta2=normuon_beta2,
                        shape_scale=shape_scale, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        self.nonfinite = check_policy(nonfinite)
        for group in self.param_groups:
            for name, p in named_params(group):
                try:
                    as_matrix_shape(p.shape)
                except ValueError as e:
                    raise ValueError(f"parameter {name}: {e}") from None

    # -- pieces DistMuon reuses -------------------------------------------------------
    @staticmethod
    def hyper(group: dict) -> MuonHyper:
        return MuonHyper(
            lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            cautious_weight_decay=group["cautious_weight_decay"],
            normuon_beta2=group["normuon_beta2"], shape_scale=group["shape_scale"],
            orthogonalize=resolve_orthogonalizer(group["orthogonalizer"], group["ns_steps"],
                                                 group["ns_dtype"]))

    def matrix_state(self, p: torch.Tensor, normuon: bool) -> dict:
        """Per-parameter fp32 state, created lazily (momentum, and NorMuon's second moment)."""
        state = self.state[p]
        rows, cols = as_matrix_shape(p.shape)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(rows, cols, dtype=torch.float32, device=p.device)
        if normuon and "second_moment" not in state:
            state["second_moment"] = torch.zeros(normuon_state_shape(rows, cols),
                                                 dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step_stack(self, params: list[torch.Tensor], grads: torch.Tensor, hp: MuonHyper) -> None:
        """Run `muon_step` on `params` (same shape) given their stacked fp32 (K, rows, cols)
        gradients, reading and writing their per-parameter state."""
        rows, cols = grads.shape[-2:]
        normuon = hp.normuon_beta2 is not None
        states = [self.matrix_state(p, normuon) for p in params]
        P = torch.stack([p.detach().reshape(rows, cols) for p in params]).float()
        M = torch.stack([s["momentum_buffer"] for s in states])
        V = torch.stack([s["second_moment"] for s in states]) if normuon else None
        muon_step(P, grads, M, V, hp)
        for i, (p, s) in enumerate(zip(params, states)):
            p.copy_(P[i].view_as(p))
            s["momentum_buffer"].copy_(M[i])
            if normuon:
                s["second_moment"].copy_(V[i])

    def apply_update(self, grads_synced: bool = False) -> None:
        for group in self.param_groups:
            hp = self.hyper(group)
            for params in stack_groups(group["params"]):
                rows, cols = as_matrix_shape(params[0].shape)
                grads = torch.stack([p.grad.reshape(rows, cols) for p in params]).float()
                self.step_stack(params, grads, hp)


def stack_groups(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters with a gradient, grouped by (shape, dtype, device) in first-seen order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(groups.values())


def __getattr__(name):
    # DistMuon lives in its own file (communication wraps the math above); re-export it
    # lazily so `torch_impl.muon.DistMuon` works without a circular import.
    if name == "DistMuon":
        from torch_impl.dist_muon import DistMuon
        return DistMuon
    raise AttributeError(name)
