"""Coefficient schedules of the polynomial orthogonalizers, as data, and the orthogonalizers named
after them (.specs/orthogonalizers.md §2).

A schedule is the list of (a, b, c) triples one Newton-Schulz run uses, step k applying
X ← a_k X + (b_k A + c_k A²) X with A = X Xᵀ (torch_impl.orthogonalizers.newton_schulz.ns_step), plus the
normalisation it was fitted with and the step counts it is defined for:

    name            triples   normalisation                  steps
    newton_schulz   1         X₀ = G/(‖G‖_F + eps)           >= 1 (the triple repeats)
    polar_express   5         X₀ = G/(1.01·‖G‖_F + eps)      >= 1 (first `steps`; the last repeats)
    cans            5         X₀ = G/(‖G‖_F + eps)           >= 1 (first `steps`; the last repeats)
    cubic           5 (c = 0) X₀ = G/(‖G‖_F + eps)           exactly 5
    deepseek_v4     10        X₀ = G/(‖G‖_F + eps)           >= 10 (the convergent last triple repeats)
    aol             5         AOL rescaling, no ‖G‖_F        1..5 (the LAST `steps` triples)

Sources: NS5 https://kellerjordan.github.io/posts/muon/; Polar Express
https://arxiv.org/abs/2505.16932; CANS https://arxiv.org/abs/2506.10935; relaxed cubic
https://arxiv.org/abs/2606.00371; DeepSeek-V4's technical report; Turbo-Muon
https://arxiv.org/abs/2512.04632. `cans`, `cubic` and `deepseek_v4` take the orthogonalizer call
convention f(G, *, steps, eps, compute_dtype) of .specs/muon_math.md §4.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from torch_impl.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    Coeffs,
    _check_matrix_input,
    from_wide,
    newton_schulz,
    normalized_wide,
)

# You Jiacheng's 5-step quintic schedule (https://x.com/YouJiacheng/status/1905861218138804534),
# as in modded-nanogpt, Dion and Gram-NS's YOU_COEFFICIENTS. Turbo-Muon (AOL) runs its last
# `steps` triples.
YOU_COEFFS: tuple[Coeffs, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# CANS (Remez + adaptive interval), 5 steps, as published (4 decimals) in
# NVIDIA-NeMo/Emerging-Optimizers muon_utils.py "cans". No safety margin: diverges in bf16 (§2.3).
CANS_COEFFS: tuple[Coeffs, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)

# Relaxed cubic schedule "cubic5", fitted for the bf16 singular-value band (lower bound 7e-3);
# c = 0, so no A·A product. Values: Emerging-Optimizers' "cubic5", which cites the paper.
CUBIC_COEFFS: tuple[Coeffs, ...] = (
    (3.3656576, -3.3420992, 0.0),
    (2.5744352, -1.4957376, 0.0),
    (2.5368962, -1.4312570, 0.0),
    (2.4418906, -1.2764040, 0.0),
    (2.2230472, -0.9630650, 0.0),
)

# DeepSeek-V4: 8 steps of NS5, then 2 of the convergent (2, -1.5, 0.5): p(1) = 1, p'(1) = 0.
CONVERGENT_COEFFS: Coeffs = (2.0, -1.5, 0.5)
DEEPSEEK_V4_COEFFS: tuple[Coeffs, ...] = (NS5_COEFFS,) * 8 + (CONVERGENT_COEFFS,) * 2


class Schedule(NamedTuple):
    """One coefficient schedule (.specs/orthogonalizers.md §2).

    normalization: "frobenius" (X₀ = G/(norm_scale·‖G‖_F + eps)) or "aol" (torch_impl.orthogonalizers.aol).
    take: "first" — step k (0-based) uses coeffs[min(k, len - 1)], the last triple repeating;
      "last" — a run of `steps` steps uses the last `steps` triples (Turbo-Muon's convention).
    min_steps, max_steps: the supported step counts (max_steps None: no upper bound).
    """

    name: str
    coeffs: tuple[Coeffs, ...]
    normalization: str
    norm_scale: float
    take: str
    min_steps: int
    max_steps: int | None
    default_steps: int
    source: str

    def supported(self) -> str:
        """The supported step counts, in words (used in error messages)."""
        if self.max_steps == self.min_steps:
            return f"steps = {self.min_steps} only"
        if self.max_steps is None:
            return f"steps >= {self.min_steps}"
        return f"{self.min_steps} <= steps <= {self.max_steps}"

    def check_steps(self, steps) -> int:
        """`steps` if this schedule supports it; ValueError naming the valid counts otherwise."""
        is_int = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
        if not is_int or steps < self.min_steps or (self.max_steps is not None and steps > self.max_steps):
            raise ValueError(f"schedule {self.name!r} supports {self.supported()}, got steps={steps!r}")
        return int(steps)

    def triples(self, steps) -> tuple[Coeffs, ...]:
        """The (a, b, c) of each of `steps` steps (ValueError for an unsupported count)."""
        steps = self.check_steps(steps)
        if self.take == "last":
            return self.coeffs[len(self.coeffs) - steps:]
        return tuple(self.coeffs[min(k, len(self.coeffs) - 1)] for k in range(steps))


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("newton_schulz", (NS5_COEFFS,), "frobenius", 1.0, "first", 1, None, 5,
                 "Keller Jordan, https://kellerjordan.github.io/posts/muon/"),
        Schedule("polar_express", POLAR_EXPRESS_COEFFS, "frobenius", POLAR_EXPRESS_NORM_SCALE, "first", 1, None, 5,
                 "Amsel et al., https://arxiv.org/abs/2505.16932 (safety_factor=2e-2, cushion=2, as nanochat)"),
        Schedule("cans", CANS_COEFFS, "frobenius", 1.0, "first", 1, None, 5,
                 "Grishina et al., https://arxiv.org/abs/2506.10935 (values: Emerging-Optimizers 'cans')"),
        Schedule("cubic", CUBIC_COEFFS, "frobenius", 1.0, "first", 5, 5, 5,
                 "Huang, https://arxiv.org/abs/2606.00371 (values: Emerging-Optimizers 'cubic5')"),
        Schedule("deepseek_v4", DEEPSEEK_V4_COEFFS, "frobenius", 1.0, "first", 10, None, 10,
                 "DeepSeek-V4 technical report (values: Emerging-Optimizers 'deepseekv4')"),
        Schedule("aol", YOU_COEFFS, "aol", 1.0, "last", 1, len(YOU_COEFFS), 4,
                 "Boissin et al. (Turbo-Muon), https://arxiv.org/abs/2512.04632; You's schedule minus its "
                 "first step (thib-s/flash-newton-schulz)"),
    )
}


def schedule(name: str) -> Schedule:
    """SCHEDULES[name], or ValueError naming the valid schedules."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _named(name: str, G, steps, eps, compute_dtype, check_finite) -> torch.Tensor:
    s = SCHEDULES[name]
    return newton_schulz(G, steps, s.triples(steps), eps, compute_dtype, s.norm_scale, check_finite)


def cans(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, compute_dtype: torch.dtype = torch.bfloat16,
         check_finite: bool = True) -> torch.Tensor:
    """newton_schulz on the CANS schedule: steps >= 1, the last triple repeats. Use fp32 (§2.3)."""
    return _named("cans", G, steps, eps, compute_dtype, check_finite)


def deepseek_v4(G: torch.Tensor, steps: int = 10, eps: float = 1e-7, compute_dtype: torch.dtype = torch.bfloat16,
                check_finite: bool = True) -> torch.Tensor:
    """newton_schulz on DeepSeek-V4's 8 + 2 schedule: steps >= 10, extra steps repeat (2, -1.5, 0.5)."""
    return _named("deepseek_v4", G, steps, eps, compute_dtype, check_finite)


def cubic(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, compute_dtype: torch.dtype = torch.bfloat16,
          check_finite: bool = True) -> torch.Tensor:
    """The relaxed cubic5 schedule: exactly 5 steps of X ← a·X + b·(X Xᵀ)X, two matmuls each.

    X₀ as newton_schulz (norm_scale 1); each step is ONE fused op X = rnd(a·X + b·(A X)) with
    A = rnd(X Xᵀ) (fp32 coefficients and accumulation): newton_schulz on (a, b, 0) would round
    b·A first and spend a third matmul on c·A² = 0. Same input errors as newton_schulz."""
    triples = SCHEDULES["cubic"].triples(steps)
    _check_matrix_input(G, check_finite, compute_dtype)
    X = normalized_wide(G, 1.0, eps, compute_dtype)
    for a, b, _ in triples:
        A = torch.bmm(X, X.mT)
        # A is symmetric: Aᵀ·X = A·X, and the transposed layout is oneDNN's fast bf16 path (ns_step).
        # planted-bug target (parity_tests/mutants.py)
        X = torch.baddbmm(X, A.mT, X, beta=a, alpha=b)
    return from_wide(X, G)
