"""torch_impl.orthogonalizers.quality.quality_metrics on matrices whose metrics are known in closed form
(.specs/orthogonalizers.md §7). float64 torch, plus two real orthogonalizers. The JAX side's
tests are tests/jax_reference/orthogonalizers/test_quality.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import matrix
from torch_impl.orthogonalizers.newton_schulz import NS5_COEFFS, exact_polar, newton_schulz
from torch_impl.orthogonalizers.quality import METRICS, quality_metrics
from torch_impl.orthogonalizers.schedules import deepseek_v4

EXACT = 1e-12  # fp64 SVD / eigh of 8..32-sized matrices: errors ~1e-15


def g64(kind, seed, *shape) -> torch.Tensor:
    return torch.from_numpy(matrix(kind, seed, int(np.prod(shape[:-1])), shape[-1], np.float64).reshape(shape))


def test_metric_names():
    assert METRICS == ("orth_error", "polar_error", "sigma_min", "sigma_max", "residual_error", "psd_error",
                       "dual_obj", "bound_violation")


@pytest.mark.parametrize("m, n", [(8, 32), (32, 8), (16, 16)])
def test_exact_polar_scores_perfectly(m, n):
    G = g64("gaussian", m * n, m, n)
    q = quality_metrics(exact_polar(G), G)
    assert tuple(q) == METRICS
    for name, v in q.items():
        assert v.dtype == torch.float64 and v.shape == (), name
    for name in ("orth_error", "polar_error", "residual_error", "psd_error", "dual_obj", "bound_violation"):
        assert abs(q[name]) <= EXACT, name
    assert abs(q["sigma_min"] - 1) <= EXACT and abs(q["sigma_max"] - 1) <= EXACT


@pytest.mark.parametrize("m, n", [(8, 32), (32, 8)])
def test_scaled_polar_factor(m, n):
    # O = c·U Vᵀ: O Oᵀ = c² I_s, H = c·V Σ Vᵀ, O H = c² G, ⟨G, O⟩ = c‖G‖_*. Tall and wide alike: the
    # orthogonality error is taken on the small side (O Oᵀ − I_m would be ≥ √((m − n)/m) when tall).
    G = g64("gaussian", 1, m, n)
    for c in (0.5, 1.5):
        q = quality_metrics(c * exact_polar(G), G)
        expected = {"orth_error": abs(c * c - 1), "polar_error": abs(c - 1), "sigma_min": c, "sigma_max": c,
                    "residual_error": abs(c * c - 1), "psd_error": 0.0, "dual_obj": 1 - c,
                    "bound_violation": max(c - 1, 0.0)}
        assert set(expected) == set(METRICS)
        for name, value in expected.items():
            assert abs(q[name] - value) <= EXACT, (name, c)


def test_a_spread_spectrum_by_hand():
    # O = U diag(t) Vᵀ with t spread in [0.7, 1.2]: every metric by its formula on t and σ.
    G = g64("gaussian", 5, 12, 20)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    t = torch.linspace(0.7, 1.2, 12, dtype=torch.float64)
    q = quality_metrics((U * t) @ Vh, G)
    expected = {"orth_error": torch.linalg.norm(t * t - 1) / math.sqrt(12),
                "polar_error": torch.linalg.norm(t - 1) / math.sqrt(12),
                "sigma_min": 0.7, "sigma_max": 1.2,
                # H = U diag(σ t) Uᵀ, H P = U diag(σ t²) Vᵀ
                "residual_error": torch.linalg.norm(s * (t * t - 1)) / torch.linalg.norm(s),
                "psd_error": 0.0, "dual_obj": (s.sum() - (s * t).sum()) / s.sum(), "bound_violation": 0.2}
    for name, value in expected.items():
        assert abs(float(q[name]) - float(value)) <= EXACT, name


def test_flipped_direction_shows_in_the_symmetric_part():
    # O = U diag(1, …, 1, −1) Vᵀ: H = V diag(σ₁, …, −σ_s) Vᵀ has one negative eigenvalue, so
    # psd_error = σ_s/‖σ_{1..s−1}‖; still orthogonal (orth_error 0, σ band [1, 1]).
    G = g64("gaussian", 2, 8, 24)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    signs = torch.ones(8, dtype=torch.float64)
    signs[-1] = -1
    q = quality_metrics((U * signs) @ Vh, G)
    assert abs(q["psd_error"] - s[-1] / torch.linalg.norm(s[:-1])) <= EXACT
    assert q["orth_error"] <= EXACT and abs(q["polar_error"] - 2 / math.sqrt(8)) <= EXACT
    assert abs(q["dual_obj"] - 2 * s[-1] / s.sum()) <= EXACT
    assert quality_metrics(-exact_polar(G), G)["psd_error"] == math.inf  # H ⪯ 0


def test_batch_nonfinite_zero_and_errors():
    G = g64("gaussian", 3, 2, 8, 16)
    O = exact_polar(G)
    O[1] *= 2.0
    q = quality_metrics(O, G)
    assert all(v.shape == (2,) for v in q.values())
    assert abs(q["sigma_max"][0] - 1) <= EXACT and abs(q["sigma_max"][1] - 2) <= EXACT
    assert abs(q["bound_violation"][1] - 1) <= EXACT and abs(q["orth_error"][1] - 3) <= EXACT
    for bad in (math.nan, math.inf):
        O[0, 0, 0] = bad
        assert all(torch.all(v == math.inf) for v in quality_metrics(O, G).values())  # a non-finite O: inf
    # A zero G: nan residual_error and dual_obj (0/0), the rest finite.
    q = quality_metrics(torch.zeros(8, 16), torch.zeros(8, 16))
    assert math.isnan(q["residual_error"]) and math.isnan(q["dual_obj"])
    assert q["orth_error"] == 1.0 and q["sigma_max"] == 0.0 and q["psd_error"] == 0.0
    # Other dtypes are measured in fp64.
    q32 = quality_metrics(exact_polar(G).float(), G.float())
    assert q32["orth_error"].dtype == torch.float64 and torch.all(q32["orth_error"] <= 1e-6)  # fp32 rounding
    with pytest.raises(ValueError, match="same shape"):
        quality_metrics(torch.zeros(8, 16), torch.ones(16, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        quality_metrics(torch.zeros(4, 4), torch.full((4, 4), math.nan))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_g_raises(case):
    x, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        quality_metrics(torch.zeros(x.shape), torch.from_numpy(x))


def test_ranks_real_orthogonalizers():
    """The metrics tell a convergent schedule from NS5's band: deepseek_v4's two convergent steps
    end within 0.3% of orthogonal, NS5 stays in its [0.68, 1.2]-style band."""
    G = torch.from_numpy(matrix("well_conditioned", 4, 16, 48))
    ns5 = quality_metrics(newton_schulz(G, 5, NS5_COEFFS, compute_dtype=torch.float32), G)
    dsv4 = quality_metrics(deepseek_v4(G, compute_dtype=torch.float32), G)
    assert dsv4["orth_error"] < 3e-3 < ns5["orth_error"]
    assert dsv4["sigma_max"] - dsv4["sigma_min"] < 3e-3 < ns5["sigma_max"] - ns5["sigma_min"]
    assert dsv4["polar_error"] < ns5["polar_error"]
    assert dsv4["bound_violation"] < 3e-3 < ns5["bound_violation"]
