"""Coefficient schedules of the polynomial orthogonalizers, as data, and the orthogonalizers named
after them (.specs/orthogonalizers.md §2, §5).

A schedule is the list of (a, b, c) triples one Newton-Schulz run uses, step k applying
X ← a_k X + (b_k A + c_k A²) X with A = X Xᵀ (jax_reference.orthogonalizers.newton_schulz), plus the
normalisation it was fitted with and the step counts it is defined for. `SCHEDULES` maps a name
to a `Schedule`; `Schedule.triples(steps)` returns the per-step triples or raises ValueError
naming the step counts the schedule supports.

    name            triples   normalisation                  steps
    newton_schulz   1         X₀ = G/(‖G‖_F + eps)           >= 1 (the triple repeats)
    polar_express   5         X₀ = G/(1.01·‖G‖_F + eps)      >= 1 (first `steps`; the last repeats)
    cans            5         X₀ = G/(‖G‖_F + eps)           >= 1 (first `steps`; the last repeats)
    cubic           5 (c = 0) X₀ = G/(‖G‖_F + eps)           exactly 5
    deepseek_v4     10        X₀ = G/(‖G‖_F + eps)           >= 10 (the convergent last triple repeats)
    aol             5         AOL rescaling, no ‖G‖_F        1..5 (the LAST `steps` triples)

The orthogonalizers `cans`, `cubic` and `deepseek_v4` share the call convention
f(G, *, steps, eps, compute_dtype) of .specs/muon_math.md §4; `cubic` skips the A·A product
(its c are all 0): X ← rnd(a X + b (A X)) in one fused op.

Public names: Schedule, SCHEDULES, schedule, YOU_COEFFS, CONVERGENT_COEFFS, CANS_COEFFS,
CUBIC_COEFFS, DEEPSEEK_V4_COEFFS, cans, cubic, deepseek_v4.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_reference.orthogonalizers.newton_schulz import (
    NS5_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_NORM_SCALE,
    Triple,
    _matmul,
    _normalize,
    checked_input,
    newton_schulz,
)

# You Jiacheng's 5-step quintic schedule (https://x.com/YouJiacheng/status/1905861218138804534),
# as in modded-nanogpt, Dion, optax's "dion" preset, Emerging-Optimizers' "quintic" and
# Gram-NS's YOU_COEFFICIENTS. Turbo-Muon (AOL) runs its last `steps` triples.
YOU_COEFFS: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# CANS (Grishina et al., https://arxiv.org/abs/2506.10935), Remez + adaptive interval, 5 steps,
# as published (4 decimals) in NVIDIA-NeMo/Emerging-Optimizers muon_utils.py "cans".
CANS_COEFFS: tuple[Triple, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)

# Relaxed cubic schedule "cubic5" (Huang 2026, https://arxiv.org/abs/2606.00371), fitted for the
# bf16 singular-value band with lower bound l0 = 7e-3; c = 0, so no A·A product. The values are
# Emerging-Optimizers' "cubic5" (which cites the paper); the paper's own table was not readable here.
CUBIC_COEFFS: tuple[Triple, ...] = (
    (3.3656576, -3.3420992, 0.0),
    (2.5744352, -1.4957376, 0.0),
    (2.5368962, -1.4312570, 0.0),
    (2.4418906, -1.2764040, 0.0),
    (2.2230472, -0.9630650, 0.0),
)

# DeepSeek-V4's hybrid schedule: 8 steps of Keller Jordan's quintic, then 2 steps of the
# convergent (2, -1.5, 0.5) (p(1) = 1, p'(1) = 0), as in Emerging-Optimizers "deepseekv4"
# (citing the DeepSeek_V4.pdf technical report).
CONVERGENT_COEFFS: Triple = (2.0, -1.5, 0.5)
DEEPSEEK_V4_COEFFS: tuple[Triple, ...] = (NS5_COEFFS,) * 8 + (CONVERGENT_COEFFS,) * 2


class Schedule(NamedTuple):
    """One coefficient schedule (.specs/orthogonalizers.md §2).

    normalization: "frobenius" (X₀ = G/(norm_scale·‖G‖_F + eps)) or "aol" (AOL rescaling,
      jax_reference.orthogonalizers.aol; norm_scale unused).
    take: "first" — step k (0-based) uses coeffs[min(k, len - 1)], so the last triple repeats;
      "last" — a run of `steps` steps uses the last `steps` triples (Turbo-Muon's convention).
    min_steps, max_steps: the supported step counts (max_steps None: no upper bound).
    """

    name: str
    coeffs: tuple[Triple, ...]
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
        ok = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
        if not ok or steps < self.min_steps or (self.max_steps is not None and steps > self.max_steps):
            raise ValueError(f"schedule {self.name!r} supports {self.supported()}, got steps={steps!r}")
        return int(steps)

    def triples(self, steps) -> tuple[Triple, ...]:
        """The (a, b, c) of each of `steps` steps (ValueError for an unsupported count)."""
        steps = self.check_steps(steps)
        if self.take == "last":
            return self.coeffs[len(self.coeffs) - steps :]
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


def _named(name: str, G, steps, eps, compute_dtype) -> jax.Array:
    s = SCHEDULES[name]
    return newton_schulz(G, steps, s.triples(steps), eps=eps, compute_dtype=compute_dtype, norm_scale=s.norm_scale)


def cans(G, steps: int = 5, eps: float = 1e-7, compute_dtype=jnp.bfloat16) -> jax.Array:
    """newton_schulz on the CANS schedule (SCHEDULES["cans"]): steps >= 1, the last triple repeats."""
    return _named("cans", G, steps, eps, compute_dtype)


def deepseek_v4(G, steps: int = 10, eps: float = 1e-7, compute_dtype=jnp.bfloat16) -> jax.Array:
    """newton_schulz on DeepSeek-V4's 8 + 2 schedule: steps >= 10, extra steps repeat (2, -1.5, 0.5)."""
    return _named("deepseek_v4", G, steps, eps, compute_dtype)


@jax.jit
def _cubic_step(X, ab):
    """One fused cubic step X ← rnd(a·X + b·(A X)), A = rnd(X Xᵀ); ab in the accumulation dtype."""
    a, b = ab[0], ab[1]
    acc = ab.dtype
    A = _matmul(X, jnp.swapaxes(X, -1, -2), acc).astype(X.dtype)
    return (a * X.astype(acc) + b * _matmul(A, X, acc)).astype(X.dtype)


def cubic(G, steps: int = 5, eps: float = 1e-7, compute_dtype=jnp.bfloat16) -> jax.Array:
    """The relaxed cubic5 schedule (SCHEDULES["cubic"]): exactly 5 steps, two matmuls per step.

    X₀ = G/(‖G‖_F + eps) as newton_schulz; each step X ← rnd(a·X + b·(A X)) with A = rnd(X Xᵀ),
    fp32 coefficients and accumulation (float64 for float64 compute), one rounding per fused op
    (torch: addmm/baddbmm(X, A, X, beta=a, alpha=b)). Same input errors as newton_schulz.
    """
    triples = SCHEDULES["cubic"].triples(steps)
    G, compute_dtype, acc = checked_input(G, compute_dtype)
    X = _normalize(G, 1.0, eps, compute_dtype)
    for a, b, _ in triples:
        X = _cubic_step(X, jnp.asarray((a, b), acc))
    if G.shape[-2] > G.shape[-1]:
        X = jnp.swapaxes(X, -1, -2)
    return X.astype(G.dtype)
