"""Tolerances of the orthogonalizer parity tests, each derived rather than tuned.

fp32. One NS step maps σ ↦ p(σ) = aσ + bσ³ + cσ⁵. A rounding error δ in a direction whose
singular value is near 0 is multiplied by p'(0) = a at that step, so after k steps the
worst-case error is about u·Π|a_i| (u = fp32 unit roundoff 2⁻²⁴ ≈ 6e-8): 2.9e-5 for five
NS5 steps (3.4445⁵ ≈ 485), 5.9e-5 for five Polar Express steps (Π a ≈ 987). Measured worst
over 160 random inputs incl. rank-deficient ones: 1.4e-5 (NS5), 3.3e-5 (PE) — inside the
bound. The tolerance is 2× the bound; real bugs (a sign, a missing normalisation, a wrong
coefficient) move the result by O(0.1–1).

bf16. Only meaningful where σ_min/σ_max is bounded away from 0 (otherwise null-space
rounding noise is amplified to O(1), measured 0.38–0.58 on rank-deficient inputs). On
U·diag(s)·Vᵀ inputs with s ∈ [0.1, 1], measured worst relative Frobenius error against the
fp64 oracle on the bf16-rounded input, 200 inputs, both frameworks: 2.5% (NS5), 5.4%
(PE); torch vs JAX 0.8% / 1.3%. The band is 1.5× the measured worst.
"""

from __future__ import annotations

import math

FP32_UNIT_ROUNDOFF = 2.0**-24


def fp32_tolerance(schedule: list[tuple[float, float, float]]) -> float:
    """2 × u·Π|a_k| over the schedule actually run (see the module docstring)."""
    return 2 * FP32_UNIT_ROUNDOFF * math.prod(abs(a) for a, _, _ in schedule)


BF16_BAND = {"newton_schulz": 0.04, "polar_express": 0.08,
             # The zoo (test_orthogonalizer_zoo_parity.py), same inputs and rule, measured worst over
             # 200 parity inputs (dims 8/24/64, batches, log-uniform s ∈ [0.1, 1]), torch / JAX:
             # gram (computed in float16, spec §3) 0.0471 / 0.0472, aol 0.0078 / 0.0078, cubic 0.0343 /
             # 0.0343, deepseek_v4 0.0072 / 0.0072. cans diverges in bf16 (spec §2.3): no band.
             "gram_newton_schulz": 0.071, "aol": 0.012, "cubic": 0.052, "deepseek_v4": 0.011}
# Spectrum floor of the bf16 inputs the band was measured on.
BF16_SPECTRUM_FLOOR = 0.1
