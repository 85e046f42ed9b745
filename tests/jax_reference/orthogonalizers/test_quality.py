"""jax_reference.orthogonalizers.quality.quality_metrics on matrices whose metrics are known in closed form
(.specs/orthogonalizers.md §7). numpy only, plus two real orthogonalizers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_reference.orthogonalizers.newton_schulz import NS5_COEFFS, exact_polar, newton_schulz
from jax_reference.orthogonalizers.quality import METRICS, quality_metrics
from jax_reference.orthogonalizers.schedules import deepseek_v4
from tests.orthogonalizer_cases import matrix

EXACT = 1e-12  # fp64 SVD / eigh of 8..32-sized matrices: errors ~1e-15


@pytest.mark.parametrize("m, n", [(8, 32), (32, 8), (16, 16)])
def test_exact_polar_scores_perfectly(m, n):
    G = matrix("gaussian", m * n, m, n, np.float64)
    q = quality_metrics(exact_polar(G), G)
    assert set(q) == set(METRICS)
    for name in ("orth_error", "polar_error", "residual_error", "psd_error", "dual_obj", "bound_violation"):
        assert abs(q[name]) <= EXACT, name
    assert abs(q["sigma_min"] - 1) <= EXACT and abs(q["sigma_max"] - 1) <= EXACT


@pytest.mark.parametrize("m, n", [(8, 32), (32, 8)])
def test_scaled_polar_factor(m, n):
    # O = c·U Vᵀ: O Oᵀ = c² I_s, H = c·V Σ Vᵀ, O H = c² G, ⟨G, O⟩ = c‖G‖_*. Tall and wide alike: the
    # orthogonality error is taken on the small side (O Oᵀ − I_m would be ≥ √((m − n)/m) when tall).
    G = matrix("gaussian", 1, m, n, np.float64)
    for c in (0.5, 1.5):
        q = quality_metrics(c * exact_polar(G), G)
        expected = {"orth_error": abs(c * c - 1), "polar_error": abs(c - 1), "sigma_min": c, "sigma_max": c,
                    "residual_error": abs(c * c - 1), "psd_error": 0.0, "dual_obj": 1 - c,
                    "bound_violation": max(c - 1, 0.0)}
        for name, value in expected.items():
            assert abs(q[name] - value) <= EXACT, (name, c)


def test_flipped_direction_shows_in_the_symmetric_part():
    # O = U diag(1, …, 1, −1) Vᵀ: H = V diag(σ₁, …, −σ_s) Vᵀ has one negative eigenvalue, so
    # psd_error = σ_s/‖σ_{1..s−1}‖; still orthogonal (orth_error 0, σ band [1, 1]).
    G = matrix("gaussian", 2, 8, 24, np.float64)
    U, s, Vh = np.linalg.svd(G, full_matrices=False)
    signs = np.ones(8)
    signs[-1] = -1
    q = quality_metrics((U * signs) @ Vh, G)
    assert abs(q["psd_error"] - s[-1] / np.linalg.norm(s[:-1])) <= EXACT
    assert q["orth_error"] <= EXACT and abs(q["polar_error"] - 2 / np.sqrt(8)) <= EXACT
    assert abs(q["dual_obj"] - 2 * s[-1] / s.sum()) <= EXACT
    assert quality_metrics(-exact_polar(G), G)["psd_error"] == np.inf  # H ⪯ 0


def test_batch_nonfinite_and_errors():
    G = matrix("gaussian", 3, 2 * 8, 16, np.float64).reshape(2, 8, 16)
    O = exact_polar(G)
    O[1] *= 2.0
    q = quality_metrics(O, G)
    assert q["sigma_max"].shape == (2,)
    assert abs(q["sigma_max"][0] - 1) <= EXACT and abs(q["sigma_max"][1] - 2) <= EXACT
    O[0, 0, 0] = np.nan
    assert all(np.all(v == np.inf) for v in quality_metrics(O, G).values())
    with pytest.raises(ValueError, match="same shape"):
        quality_metrics(np.zeros((8, 16)), np.ones((16, 8)))
    with pytest.raises(ValueError, match="NaN or inf"):
        quality_metrics(np.zeros((4, 4)), np.full((4, 4), np.nan))


def test_ranks_real_orthogonalizers():
    """The metrics tell a convergent schedule from NS5's band: deepseek_v4's two convergent steps
    end within 0.3% of orthogonal, NS5 stays in its [0.68, 1.2]-style band."""
    G = matrix("well_conditioned", 4, 16, 48)
    ns5 = quality_metrics(newton_schulz(G, 5, NS5_COEFFS, compute_dtype=jnp.float32), G)
    dsv4 = quality_metrics(deepseek_v4(G, compute_dtype=jnp.float32), G)
    assert dsv4["orth_error"] < 3e-3 < ns5["orth_error"]
    assert dsv4["sigma_max"] - dsv4["sigma_min"] < 3e-3 < ns5["sigma_max"] - ns5["sigma_min"]
    assert dsv4["polar_error"] < ns5["polar_error"]
