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

`muon_step` is the only place this math lives (.specs/muon_math.md states it once for
both frameworks), in two halves: `muon_direction` (everything up to O, on whole matrices)
and `apply_direction` (the last line, elementwise). The optimizer in torch_impl/optim/base.py
calls `muon_step` on the matrices of each same-shape stack that its rank holds; on FSDP2
parameters the owner runs `muon_direction` and every rank `apply_direction` on its rows.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_impl.orthogonalizers.aol import aol
from torch_impl.orthogonalizers.gram_newton_schulz import gram_newton_schulz
from torch_impl.orthogonalizers.newton_schulz import frobenius_norm, newton_schulz, polar_express
from torch_impl.orthogonalizers.schedules import SCHEDULES, cans, cubic, deepseek_v4

SHAPE_SCALES = ("max_ratio", "match_rms_adamw")


def shape_scale(rows: int, cols: int, rule: str) -> float:
    """Update multiplier that makes the orthogonalized update's size shape-aware."""
    if rule == "max_ratio":
        # planted-bug target (parity_tests/mutants.py)
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
def muon_direction(
    grads: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor | None,
    hp: MuonHyper,
) -> torch.Tensor:
    """O of one step on fp32 (K, rows, cols) stacks of whole matrices: momentum, Nesterov,
    orthogonalization and NorMuon. `momentum_buf` and `second_moment` are updated in place,
    `grads` is read only. Needs whole matrices (the orthogonalizer and NorMuon's norms are
    not row-local); the FSDP2 optimizer runs it on the owner of each matrix."""
    rows, cols = grads.shape[-2:]
    momentum_buf.lerp_(grads, 1 - hp.momentum)
    # planted-bug target (parity_tests/mutants.py)
    update = grads.lerp(momentum_buf, hp.momentum) if hp.nesterov else momentum_buf
    O = hp.orthogonalize(update).to(grads.dtype)
    if hp.normuon_beta2 is not None:
        reduce_dim = -1 if rows >= cols else -2
        second_moment.lerp_(O.square().mean(dim=reduce_dim, keepdim=True), 1 - hp.normuon_beta2)
        scaled = O * second_moment.clamp_min(1e-10).rsqrt()
        O = scaled * (frobenius_norm(O) / frobenius_norm(scaled).clamp_min(1e-10))
    return O


@torch.no_grad()
def apply_direction(params: torch.Tensor, O: torch.Tensor, hp: MuonHyper, rows: int, cols: int) -> None:
    """P ← P·(1 − lr·wd·mask) − lr·scale·O in place, for (rows × cols) matrices. Elementwise,
    so any rows of `params` may be updated with the same rows of O apart from the others (an
    FSDP2 rank updates its shard); `rows`, `cols` are the whole matrix's shape."""
    # planted-bug target (parity_tests/mutants.py)
    if hp.weight_decay != 0:
        decay = hp.lr * hp.weight_decay
        if hp.cautious_weight_decay:
            # decay only where the step and the weight agree in sign (exact zeros decay too)
            # planted-bug target (parity_tests/mutants.py)
            params.sub_(params * (O * params >= 0), alpha=decay)
        else:
            params.mul_(1 - decay)
    # planted-bug target (parity_tests/mutants.py)
    params.add_(O, alpha=-hp.lr * shape_scale(rows, cols, hp.shape_scale))


@torch.no_grad()
def muon_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor | None,
    hp: MuonHyper,
) -> None:
    """One Muon step, in place, on fp32 stacks of shape (K, rows, cols): muon_direction, then
    apply_direction. `params`, `momentum_buf` and `second_moment` are updated in place;
    `grads` is read only. `second_moment` has shape (K, *normuon_state_shape(rows, cols))
    when NorMuon is on."""
    apply_direction(params, muon_direction(grads, momentum_buf, second_moment, hp).to(params.dtype),
                    hp, *params.shape[-2:])


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


# ---- MuonEq and Muon+: maps around the orthogonalizer (.specs/orthogonalizers.md §6) ----
ROW_EQUILIBRATION_EPS = 1e-6  # floors of the row norms and of ‖O‖_F, as nanochat's clamp_min(1e-6)
FROBENIUS_RENORMALIZATION_EPS = 1e-6


def row_equilibrate(X: torch.Tensor) -> torch.Tensor:
    """MuonEq (R) (Chang et al., https://arxiv.org/abs/2603.28254): each row of every fp32
    (rows, cols) matrix rescaled to the quadratic-mean row norm t = ‖X‖_F/√rows,
    X_i ← X_i · t / max(‖X_i‖₂, 1e-6). Rows above the floor all end with norm t, so ‖X‖_F is kept."""
    target = frobenius_norm(X) / math.sqrt(X.shape[-2])
    # planted-bug target (parity_tests/mutants.py)
    row_norm = X.square().sum(dim=-1, keepdim=True).sqrt().clamp_min(ROW_EQUILIBRATION_EPS)
    return X * (target / row_norm)


def frobenius_renormalize(O: torch.Tensor) -> torch.Tensor:
    """Muon+ as nanochat (citing https://arxiv.org/abs/2602.21545):
    O · √min(rows, cols) / max(‖O‖_F, 1e-6), the Frobenius norm of an exactly semi-orthogonal matrix."""
    # planted-bug target (parity_tests/mutants.py)
    return O * (math.sqrt(min(O.shape[-2:])) / frobenius_norm(O).clamp_min(FROBENIUS_RENORMALIZATION_EPS))


def balanced(orthogonalize: Callable[[torch.Tensor], torch.Tensor], row_equilibration: bool,
             frobenius_renormalization: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """X ↦ renorm(orth(equilibrate(X))), each map only when asked; with both off, `orthogonalize`
    itself (Muon unchanged bit for bit). Whole-matrix maps: they run wherever orth runs."""
    if not (row_equilibration or frobenius_renormalization):
        return orthogonalize

    def orth(X: torch.Tensor) -> torch.Tensor:
        if row_equilibration:
            X = row_equilibrate(X)
        O = orthogonalize(X).to(torch.float32)
        return frobenius_renormalize(O) if frobenius_renormalization else O

    return orth
