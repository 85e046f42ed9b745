"""torch_impl.orthogonalizers.newton_schulz vs jax_reference.orthogonalizers.newton_schulz vs exact fp64 oracles.

fp32: both frameworks against the polynomial oracle, and against each other.
bf16: each framework against the oracle on the bf16-rounded input, never elementwise
torch-vs-JAX (see tolerances.py). Plus properties checked against fp64 oracles on both
implementations with the same inputs and tolerances, and the NS inside torch.optim.Muon and
optax.contrib.muon. Bad-input errors are each framework's own unit tests
(tests/torch_impl/orthogonalizers/test_newton_schulz.py, tests/jax_reference/orthogonalizers/test_newton_schulz.py)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import jax_reference.orthogonalizers.newton_schulz as J
import torch_impl.orthogonalizers.newton_schulz as T
from parity_tests.inputs import build_matrix, matrix_specs, rel_fro
from parity_tests.tolerances import BF16_BAND, BF16_SPECTRUM_FLOOR, FP32_UNIT_ROUNDOFF, fp32_tolerance

SCHEDULES = {
    "newton_schulz": (T.NS5_COEFFS, 1.0),
    "polar_express": (T.POLAR_EXPRESS_COEFFS, T.POLAR_EXPRESS_NORM_SCALE),
}


def run_torch(G: np.ndarray, name: str, steps: int, dtype=torch.float32) -> np.ndarray:
    coeffs, norm_scale = SCHEDULES[name]
    out = T.newton_schulz(torch.from_numpy(G.copy()).to(dtype), steps, coeffs,
                          compute_dtype=dtype, norm_scale=norm_scale)
    assert out.dtype == dtype and out.shape == G.shape
    return out.float().numpy()


def run_jax(G: np.ndarray, name: str, steps: int, dtype=jnp.float32) -> np.ndarray:
    coeffs, norm_scale = SCHEDULES[name]
    out = J.newton_schulz(jnp.asarray(G).astype(dtype), steps, coeffs,
                          compute_dtype=dtype, norm_scale=norm_scale)
    assert out.dtype == dtype and out.shape == G.shape
    return np.asarray(out.astype(jnp.float32))


IMPLS = {"torch": run_torch, "jax": run_jax}


def oracle(G: np.ndarray, name: str, steps: int) -> np.ndarray:
    coeffs, norm_scale = SCHEDULES[name]
    return T.polynomial_oracle(torch.from_numpy(G.copy()), coeffs, steps,
                               norm_scale=norm_scale).numpy()


schedules = st.sampled_from(sorted(SCHEDULES))
steps = st.integers(1, 6)


@given(spec=matrix_specs(), name=schedules, k=steps)
def test_fp32_both_frameworks_match_the_polynomial_oracle(spec, name, k):
    G = build_matrix(spec)
    ref = oracle(G, name, k)
    tol = fp32_tolerance(T.coefficient_schedule(SCHEDULES[name][0], k))
    t, j = run_torch(G, name, k), run_jax(G, name, k)
    assert rel_fro(t, ref) <= tol
    assert rel_fro(j, ref) <= tol
    assert rel_fro(t, j) <= 2 * tol  # each is within tol of the same oracle


@given(spec=matrix_specs(conditioning=("spectrum",)), name=schedules)
def test_bf16_each_framework_stays_in_the_band_around_the_oracle(spec, name):
    G = build_matrix(spec, s_min=BF16_SPECTRUM_FLOOR)
    G = G.astype(ml_dtypes.bfloat16).astype(np.float32)  # both see exactly these values
    ref = oracle(G, name, 5)
    assert rel_fro(run_torch(G, name, 5, torch.bfloat16), ref) <= BF16_BAND[name]
    assert rel_fro(run_jax(G, name, 5, jnp.bfloat16), ref) <= BF16_BAND[name]


# ---- properties with no second framework, checked on both implementations -------------

impls = st.sampled_from(sorted(IMPLS))


@given(spec=matrix_specs(), name=schedules, impl=impls)
def test_transpose_equivariance(spec, name, impl):
    G = build_matrix(spec)
    f = IMPLS[impl]
    tol = fp32_tolerance(T.coefficient_schedule(SCHEDULES[name][0], 5))
    assert rel_fro(np.swapaxes(f(np.ascontiguousarray(np.swapaxes(G, -1, -2)), name, 5), -1, -2),
                   f(G, name, 5)) <= tol


@given(spec=matrix_specs(conditioning=("gaussian", "spectrum")), name=schedules, impl=impls)
def test_left_right_orthogonal_invariance(spec, name, impl):
    """NS acts on singular values only: f(Q G R) = Q f(G) R for orthogonal Q, R."""
    G = build_matrix(spec)
    rng = np.random.default_rng(spec["seed"] + 1)
    m, n = G.shape[-2:]
    Q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    R, _ = np.linalg.qr(rng.standard_normal((n, n)))
    rotated = (Q @ G.astype(np.float64) @ R).astype(np.float32)
    f = IMPLS[impl]
    # Rounding the rotated input to fp32 adds one more u of input error: 2 × the NS tolerance.
    tol = 2 * fp32_tolerance(T.coefficient_schedule(SCHEDULES[name][0], 5))
    assert rel_fro(f(rotated, name, 5), Q @ f(G, name, 5).astype(np.float64) @ R) <= tol


@given(spec=matrix_specs(), name=schedules, impl=impls, log2c=st.integers(0, 40))
def test_scale_invariance(spec, name, impl, log2c):
    """f(c·G) = f(G) for c > 0, up to eps. Powers of two scale exactly, so only eps differs:
    with unit-scale inputs (‖G‖_F ≳ 1) and c ≥ 1 its relative effect on σ is ≤ 1e-7, below
    fp32 rounding. (For tiny ‖c·G‖_F, eps genuinely changes the result: not a symmetry.)"""
    spec = dict(spec, scale=1.0)
    G = build_matrix(spec)
    f = IMPLS[impl]
    tol = fp32_tolerance(T.coefficient_schedule(SCHEDULES[name][0], 5))
    c = np.float32(2.0**log2c)
    assert rel_fro(f(G * c, name, 5), f(G, name, 5)) <= tol


@given(spec=matrix_specs(batches=((3,), (2, 2))), name=schedules, impl=impls)
def test_batch_equals_loop_over_matrices(spec, name, impl):
    G = build_matrix(spec)
    f = IMPLS[impl]
    batched = f(G, name, 5)
    flat = G.reshape(-1, *G.shape[-2:])
    looped = np.stack([f(np.ascontiguousarray(x), name, 5) for x in flat]).reshape(G.shape)
    # Same ops on the same numbers; BLAS may block a batched call differently: 1 fp32 tolerance.
    assert rel_fro(batched, looped) <= fp32_tolerance(T.coefficient_schedule(SCHEDULES[name][0], 5))


@given(spec=matrix_specs(conditioning=("spectrum",), batches=((),)), name=schedules, impl=impls,
       s_min=st.sampled_from((0.05, 0.2, 0.5)))
def test_singular_values_stay_inside_the_polynomial_band(spec, name, impl, s_min):
    """For input σ in [lo, hi] (after normalisation), output σ lie in the image of [lo, hi]
    under the composed scalar polynomials — computed here on a fine grid in fp64."""
    G = build_matrix(spec, s_min=s_min)
    coeffs, norm_scale = SCHEDULES[name]
    s = np.linalg.svd(G.astype(np.float64), compute_uv=False)
    s = s / (np.linalg.norm(s) * norm_scale + 1e-7)
    grid = np.linspace(s.min(), s.max(), 20001)
    for a, b, c in T.coefficient_schedule(coeffs, 5):
        grid = a * grid + b * grid**3 + c * grid**5
    out_s = np.linalg.svd(IMPLS[impl](G, name, 5).astype(np.float64), compute_uv=False)
    # Grid spacing error ≤ max|p'|·Δ ≈ 1e-3 in the worst step; fp32 output error ≤ fp32 tolerance.
    slack = 2e-3 + fp32_tolerance(T.coefficient_schedule(coeffs, 5))
    assert grid.min() - slack <= out_s.min() and out_s.max() <= grid.max() + slack


CONVERGENT = (2.0, -1.5, 0.5)  # p(1) = 1, p'(1) = 0: converges quadratically to the polar factor


@given(spec=matrix_specs(conditioning=("spectrum",)), impl=impls)
def test_convergent_coefficients_reach_the_exact_polar_factor(spec, impl):
    G = build_matrix(spec, s_min=0.1)
    m, n = G.shape[-2:]
    # σ_min/‖G‖_F ≥ 0.1/√min(m,n) ≥ 0.0125: p(s) ≈ 2s doubles it to ~1 within 7 steps, then
    # quadratic convergence; 25 steps leave only fp32 rounding, which p'(1) = 0 does not amplify.
    if impl == "torch":
        out = T.newton_schulz(torch.from_numpy(G.copy()), 25, CONVERGENT,
                              compute_dtype=torch.float32).numpy()
    else:
        out = np.asarray(J.newton_schulz(jnp.asarray(G), 25, CONVERGENT, compute_dtype=jnp.float32))
    ref = T.exact_polar(torch.from_numpy(G.copy())).numpy()
    # ~√(min(m,n))·u per entry relative; 64·u·√64 ≈ 3e-5 is ample and still 4 orders below a bug.
    assert rel_fro(out, ref) <= 64 * FP32_UNIT_ROUNDOFF * np.sqrt(min(m, n))
    np.testing.assert_allclose(J.exact_polar(G), ref, rtol=0, atol=1e-12)  # both fp64 oracles agree


# ---- outside oracles ---------------------------------------------------------------------

@given(spec=matrix_specs(conditioning=("spectrum",), batches=((),)))
def test_ns_inside_torch_optim_muon_agrees(spec):
    """torch.optim.Muon's NS always runs in bf16 (it calls grad.bfloat16()) and normalises with
    clamp(min=eps): compare in the bf16 band, both against the oracle and against ours."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    G = build_matrix(spec, s_min=BF16_SPECTRUM_FLOOR).astype(ml_dtypes.bfloat16).astype(np.float32)
    theirs = _zeropower_via_newtonschulz(torch.from_numpy(G.copy()), T.NS5_COEFFS, 5, 1e-7).float().numpy()
    ours = run_torch(G, "newton_schulz", 5, torch.bfloat16)
    band = BF16_BAND["newton_schulz"]
    assert rel_fro(theirs, oracle(G, "newton_schulz", 5)) <= band
    assert rel_fro(ours, theirs) <= 2 * band


@given(spec=matrix_specs(conditioning=("gaussian", "spectrum"), batches=((),)), name=schedules)
def test_ns_inside_optax_contrib_muon_agrees_in_fp32(spec, name):
    """optax casts coefficients to the input dtype (fp32 here: what we use too) and takes a
    per-step (n, 3) array for Polar Express. It has no norm cushion (it renormalises its own
    input), so ours runs the same schedule with norm_scale=1; eps matched (its default 1e-8)."""
    from optax.contrib._muon import orthogonalize_via_newton_schulz
    coeffs, _ = SCHEDULES[name]
    G = build_matrix(spec)
    schedule = T.coefficient_schedule(coeffs, 5)
    theirs = np.asarray(orthogonalize_via_newton_schulz(
        jnp.asarray(G), jnp.asarray(schedule, jnp.float32), 5, eps=1e-7))
    ours = T.newton_schulz(torch.from_numpy(G.copy()), 5, coeffs, compute_dtype=torch.float32).numpy()
    tol = fp32_tolerance(schedule)
    assert rel_fro(ours, theirs) <= 2 * tol  # each within tol of the same oracle
