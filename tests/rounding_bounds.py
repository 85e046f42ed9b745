"""First-order rounding bounds of the polynomial orthogonalizers, derived from their coefficients.

Shared by tests/jax_reference and tests/torch_impl (test_schedules, test_gram_newton_schulz, test_aol,
test_muon_variants) and by parity_tests/test_orthogonalizer_zoo_parity.py. Every tolerance there is
2·u·κ (u: unit roundoff, 2⁻²⁴ fp32, 2⁻⁵³ fp64), the convention of parity_tests/tolerances.py, with κ
computed here:

Newton-Schulz (`ns_condition`). Every step maps each singular value s ↦ p_k(s); a rounding error
entering before step k in the direction of singular value s_k leaves the run multiplied by
Π_{j≥k} |p_j'(s_j)|. The largest such product over the input interval [0, s_max]
(s_max = 1/norm_scale; 1 for AOL, whose X₀ has ‖X₀‖₂ ≤ 1) is

    κ = max_{s ∈ [0, s_max]} Π_k |p_k'(s_k)|,      s_0 = s, s_{k+1} = p_k(s_k).

At s → 0 it is Π|a_k| (p'(0) = a), parity_tests/tolerances.py's bound; schedules whose polynomials
are steep near the top of their range (CANS: κ ≈ 4.9e4 at s = 1, against Π|a_k| ≈ 1.0e3) have
the larger κ.

Gram Newton-Schulz (`gram_condition`). Its roundings fall on R = X Xᵀ, Q and the applications
X ← Q X. Within a segment (between restarts), X_end = f_k(R_k)·X_k with f_k(r) the product of the
remaining p̃_j(r_j) = a_j + b_j r_j + c_j r_j², r_{j+1} = p̃_j(r_j)² r_j. By the Daleckii–Krein
formula an error E in R_k (‖E‖ ≈ u‖R_k‖) moves X_end by at most
max_{i,j} |f_k[r_i, r_j]|·σ_j·‖E‖ (f[x, y] the divided difference, σ_j the singular values of X_k);
an error in Q_k (≈ u‖Q_k‖) by ‖Q_k‖·max_s |rest of the product · σ_start|; each application
X ← Q X by u‖X‖. Errors at a segment's end then run through the later steps as NS errors
(× max_s Π_{later} |p_j'(s_j)|). κ_gram is the sum of these terms. For Polar Express with the
authors' restart after step 2, κ_gram ≈ 6.8e3 against NS's 989 (≈ 2.3e5 without a restart, the
reason the authors restart; ≈ 1.9e3 restarting after every step).
"""

from __future__ import annotations

import numpy as np

FP32_U = 2.0**-24
FP64_U = 2.0**-53


def tolerance(u: float, kappa: float) -> float:
    """2·u·κ (the factor 2 covers the several roundings per step and second-order terms)."""
    return 2 * u * kappa


def _trajectory(triples, s):
    """Singular values entering each step, and after the last: a list of len(triples) + 1 arrays."""
    out = [s]
    for a, b, c in triples:
        x = out[-1]
        out.append(a * x + b * x**3 + c * x**5)
    return out


def _dp(abc, x):
    a, b, c = abc
    return np.abs(a + 3 * b * x**2 + 5 * c * x**4)


def ns_condition(triples, s_max: float = 1.0, n: int = 100_001) -> float:
    """κ = max over s ∈ [0, s_max] of Π_k |p_k'(s_k)| (see the module docstring)."""
    traj = _trajectory(triples, np.linspace(0.0, s_max, n))
    prod = np.ones(n)
    for k, abc in enumerate(triples):
        prod *= _dp(abc, traj[k])
    return float(prod.max())


def gram_condition(triples, restart_after, s_max: float = 1.0, n: int = 801) -> float:
    """κ_gram of Gram Newton-Schulz with restarts after the steps in `restart_after` (module docstring)."""
    triples = list(triples)
    K = len(triples)
    s = np.linspace(0.0, s_max, n)
    sig = _trajectory(triples, s)
    starts = [0] + sorted(j for j in set(restart_after) if 0 < j < K)
    ends = starts[1:] + [K]
    ptilde = lambda k, r: triples[k][0] + triples[k][1] * r + triples[k][2] * r * r

    def later(k_from):  # NS amplification of an X error through steps k_from..K-1
        prod = np.ones(n)
        for j in range(k_from, K):
            prod *= _dp(triples[j], sig[j])
        return float(prod.max())

    def rest(k, end, r):  # Π_{j=k}^{end-1} p̃_j(r_j) with r_k = r
        out, rr = np.ones_like(r), r.copy()
        for j in range(k, end):
            p = ptilde(j, rr)
            out, rr = out * p, p * p * rr
        return out

    kappa = 0.0
    for st, en in zip(starts, ends):
        amp = later(en)
        q = np.ones(n)
        for k in range(st, en):
            r = sig[k] ** 2
            f = rest(k, en, r)
            h = 1e-7 * max(float(r.max()), 1e-30)
            deriv = (rest(k, en, r + h) - f) / h
            ri, rj = r[:, None], r[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                dd = np.where(np.abs(ri - rj) > 1e-12, (f[:, None] - f[None, :]) / (ri - rj), deriv[:, None])
            kappa += float(np.max(np.abs(dd) * sig[k][None, :])) * float(r.max()) * amp  # R_k rounding
            q = q * ptilde(k, r)  # Q after step k
            if k + 1 < en:  # Q_k rounding, carried by the rest of the segment
                carried = np.abs(rest(k + 1, en, sig[k + 1] ** 2) * sig[st])
                kappa += float(np.abs(q).max()) * float(carried.max()) * amp
        kappa += float(np.abs(sig[en]).max()) * amp  # X ← Q X at the segment's end
    return kappa



def equilibrate_bound(m: int, n: int, u: float = FP32_U) -> float:
    """First-order bound on the relative error of each element of MuonEq's X_i·t/‖X_i‖ in precision u
    (m × n, fp32 by default): t = √(Σ X²)/√m sums m·n positive squares, ‖X_i‖ sums n; recursive
    summation of k positive terms is within (k − 1)·u relative (Higham, Accuracy and Stability, §4.2),
    halved by the square root; each square adds u (½u after the root); plus ½u for each square root,
    u each for ÷√m, the division and the product. No κ: every operation acts on positive numbers, so
    there is no cancellation to amplify."""
    return ((m * n - 1) / 2 + (n - 1) / 2 + 5) * u
