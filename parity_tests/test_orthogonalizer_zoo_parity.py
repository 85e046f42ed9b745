"""Every registered orthogonalizer (.specs/orthogonalizers.md §1): torch_impl vs jax_reference vs the
fp64 oracles, optax's AOL, and Muon trajectories with each method and the MuonEq / Muon+ options.

Tolerances are 2·u·κ with κ derived from each schedule's coefficients (tests/rounding_bounds.py,
spec §8); bf16 is compared to the oracle on the bf16-rounded input, never torch-to-JAX elementwise
(tolerances.py). The oracle of the polynomial methods is polynomial_oracle on the method's
schedule (gram_newton_schulz: Polar Express's, equal in exact arithmetic); AOL's is aol_oracle."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from optax.contrib import _muon as optax_muon

import jax_reference.optim.muon as JM
import jax_reference.orthogonalizers.aol as JAOL
import jax_reference.orthogonalizers.registry as JR
import torch_impl.orthogonalizers.aol as TAOL
import torch_impl.orthogonalizers.newton_schulz as TO
import torch_impl.orthogonalizers.registry as TR
from parity_tests.inputs import build_matrix, matrix_specs, rel_fro
from parity_tests.lockstep import lockstep, trajectory_inputs
from parity_tests.tolerances import BF16_BAND, BF16_SPECTRUM_FLOOR
from parity_tests.tolerances import FP32_UNIT_ROUNDOFF as U
from tests.rounding_bounds import gram_condition, ns_condition, tolerance
from torch_impl.optim import Muon
from torch_impl.optim.muon import shape_scale
from torch_impl.orthogonalizers.gram_newton_schulz import RESTART_AFTER
from torch_impl.orthogonalizers.schedules import SCHEDULES

NAMES = tuple(TR.ORTHOGONALIZERS)


def schedule_of(name: str):
    s = SCHEDULES[TR.ORTHOGONALIZER_SCHEDULES[name]]
    return s, s.triples(TR.default_steps(name))


def kappa(name: str) -> float:
    """κ of the method at its default step count (spec §8): NS-type products of |p'|, Gram NS's
    Daleckii–Krein sum; AOL's X₀ has ‖X₀‖₂ ≤ 1, the Frobenius methods σ ≤ 1/norm_scale."""
    s, triples = schedule_of(name)
    if name == "gram_newton_schulz":
        return gram_condition(triples, RESTART_AFTER, 1 / s.norm_scale)
    return ns_condition(triples, 1 / s.norm_scale)


def fp32_tol(name: str) -> float:
    return tolerance(U, kappa(name))


def run_torch(G: np.ndarray, name: str, dtype=torch.float32) -> np.ndarray:
    out = TR.ORTHOGONALIZERS[name](torch.from_numpy(G.copy()).to(dtype), steps=TR.default_steps(name),
                                   eps=TR.NS_EPS, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == G.shape
    return out.float().numpy()


def run_jax(G: np.ndarray, name: str, dtype=jnp.float32) -> np.ndarray:
    out = JR.ORTHOGONALIZERS[name](jnp.asarray(G).astype(dtype), steps=TR.default_steps(name), eps=TR.NS_EPS,
                                   compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == G.shape
    return np.asarray(out.astype(jnp.float32))


def oracle(G: np.ndarray, name: str) -> np.ndarray:
    G64 = torch.from_numpy(G.copy())
    if name == "aol":
        return TAOL.aol_oracle(G64, TR.default_steps(name), TR.NS_EPS).numpy()
    s, triples = schedule_of(name)
    return TO.polynomial_oracle(G64, triples, len(triples), TR.NS_EPS, s.norm_scale).numpy()


def test_both_frameworks_register_the_same_methods_with_the_same_schedules():
    assert tuple(TR.ORTHOGONALIZERS) == tuple(JR.ORTHOGONALIZERS)
    assert TR.ORTHOGONALIZER_SCHEDULES == JR.ORTHOGONALIZER_SCHEDULES
    from jax_reference.orthogonalizers.schedules import SCHEDULES as JS  # the data, written twice: must agree exactly
    assert {k: tuple(v) for k, v in SCHEDULES.items()} == {k: tuple(v) for k, v in JS.items()}


def _explicit_per_method(test):
    """One explicit example per method (batched, wide, Gaussian), whatever hypothesis draws: the
    planted bugs of parity_tests/mutants.py in any one method must be met by this test."""
    for name in NAMES:
        test = example(spec=dict(batch=(3,), m=24, n=64, seed=5, kind="gaussian", scale=1.0), name=name)(test)
    return test


@given(spec=matrix_specs(), name=st.sampled_from(NAMES))
@_explicit_per_method
def test_fp32_both_frameworks_match_the_oracle(spec, name):
    G = build_matrix(spec)
    ref, tol = oracle(G, name), fp32_tol(name)
    t, j = run_torch(G, name), run_jax(G, name)
    assert rel_fro(t, ref) <= tol
    assert rel_fro(j, ref) <= tol
    assert rel_fro(t, j) <= 2 * tol  # each within tol of the same oracle


def test_the_two_aol_oracles_agree():
    """torch's and JAX's fp64 AOL oracles, written separately from the paper: equal to fp64 rounding
    (SVD and the row sums: 1e-12 is ~5000 u64, far below any implementation difference)."""
    for spec in [dict(batch=(), m=8, n=24, seed=1, kind="gaussian"), dict(batch=(2,), m=24, n=8, seed=2,
                                                                           kind="low_rank")]:
        G = build_matrix(spec)
        assert rel_fro(TAOL.aol_oracle(torch.from_numpy(G.copy())).numpy(), JAOL.aol_oracle(G)) <= 1e-12


@given(spec=matrix_specs(conditioning=("spectrum",)),
       name=st.sampled_from([n for n in NAMES if n != "cans"]))  # cans diverges in bf16 (spec §2.3)
def test_bf16_each_framework_stays_in_the_band_around_the_oracle(spec, name):
    G = build_matrix(spec, s_min=BF16_SPECTRUM_FLOOR)
    G = G.astype(ml_dtypes.bfloat16).astype(np.float32)  # both see exactly these values
    ref = oracle(G, name)
    assert rel_fro(run_torch(G, name, torch.bfloat16), ref) <= BF16_BAND[name]
    assert rel_fro(run_jax(G, name, jnp.bfloat16), ref) <= BF16_BAND[name]


@given(spec=matrix_specs(batches=((),)))
def test_aol_matches_optax_aol_preconditioning(spec):
    """optax.contrib 0.2.8 folds the same AOL rescaling into its first step (an outside
    implementation). Given exactly the 4 Turbo-Muon rows (a shorter table silently runs fewer
    steps), in fp32 it is within the AOL bound of ours: both within 2uκ of the oracle.
    eps is 1e-8 on both sides: optax does not forward its `eps` argument to the AOL step
    (`_aol_ns_iterator` calls it with the default 1e-8), which shows where the floor binds
    (row sums of |X Xᵀ| below eps: the 1e-3-scaled inputs here; measured 1.5% apart with 1e-7)."""
    G = build_matrix(spec)
    table = jnp.asarray(SCHEDULES["aol"].triples(4), jnp.float32)
    theirs = optax_muon.orthogonalize_via_newton_schulz(jnp.asarray(G), table, 4, "aol", 1e-8)
    ours = TAOL.aol(torch.from_numpy(G.copy()), 4, 1e-8, torch.float32).numpy()
    assert rel_fro(ours, np.asarray(theirs)) <= 2 * fp32_tol("aol")


# ---- Muon trajectories with every method and the MuonEq / Muon+ options ----------------

SHAPES = ((8, 8), (24, 8), (8, 24), (4, 3, 5))


@st.composite
def variant_cases(draw):
    return dict(shapes=draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)),
                steps=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**31 - 1)),
                orth=draw(st.sampled_from(NAMES)), lr=draw(st.sampled_from((0.02, 0.05))),
                wd=draw(st.sampled_from((0.0, 0.1))), momentum=draw(st.sampled_from((0.0, 0.95))),
                nesterov=draw(st.booleans()), normuon=draw(st.sampled_from((None, 0.95))),
                row_eq=draw(st.booleans()), renorm=draw(st.booleans()),
                scale=draw(st.sampled_from(("max_ratio", "match_rms_adamw"))))


def variant_tolerance(case, shape) -> float:
    """Per step, ‖ΔO‖_F ≤ 2·tol·‖O‖_F with ‖O‖_F ≤ σ_max·√min(m, n); σ_max ≤ 1.3 for every method
    at its default steps (cubic's scalar map reaches 1.3, the others ≤ 1.21). NorMuon and Muon+ are
    smooth rescalings of O: ×3 each. Plus 8 fp32 ULPs of |p| ≤ 4 per step (lerp and decay rounding,
    as test_muon_parity)."""
    rows, cols = shape[0], math.prod(shape[1:])
    per_step = case["lr"] * shape_scale(rows, cols, case["scale"]) * 2 * fp32_tol(case["orth"]) \
        * 1.3 * math.sqrt(min(rows, cols)) * (3 if case["normuon"] else 1) * (3 if case["renorm"] else 1)
    return case["steps"] * (per_step + 8 * U * 4.0)


EXPLICIT = [dict(shapes=[(8, 24), (24, 8)], steps=3, seed=11, orth=orth, lr=0.05, wd=0.1, momentum=0.95,
                 nesterov=True, normuon=0.95, row_eq=True, renorm=True, scale="max_ratio")
            for orth in ("aol", "gram_newton_schulz")]


@given(case=variant_cases())
@example(case=EXPLICIT[0]).via("explicit: aol, MuonEq, Muon+, NorMuon")
@example(case=EXPLICIT[1]).via("explicit: gram_newton_schulz, MuonEq, Muon+, NorMuon")
def test_muon_variant_trajectory_torch_equals_jax(case):
    params, grads = trajectory_inputs(case)
    common = dict(momentum=case["momentum"], nesterov=case["nesterov"], orthogonalizer=case["orth"],
                  ns_steps=TR.default_steps(case["orth"]), weight_decay=case["wd"], normuon_beta2=case["normuon"],
                  shape_scale=case["scale"], row_equilibration=case["row_eq"],
                  frobenius_renormalization=case["renorm"])
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = Muon(tp, lr=case["lr"], ns_dtype=torch.float32, **common)
    tx = JM.muon(case["lr"], ns_dtype=jnp.float32, **common)
    for t, jp, _ in lockstep(topt, tp, tx, params, grads):
        for i, (p, q) in enumerate(zip(tp, jp)):
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(q), rtol=0,
                                       atol=variant_tolerance(dict(case, steps=t + 1), p.shape),
                                       err_msg=f"param {i} {tuple(p.shape)} after step {t + 1}")
