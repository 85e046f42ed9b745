"""MuonEq and Muon+: maps around an orthogonalizer (.specs/orthogonalizers.md §6), each off by
default. MuonEq balances the rows of the input before it; Muon+ restores the Frobenius norm of an
exactly semi-orthogonal matrix after it. `balanced` composes them with any orthogonalizer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torch_impl.orthogonalizers.newton_schulz import frobenius_norm

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
