"""Muon and AdamW trajectories: torch_impl vs jax_reference vs outside implementations.

Tolerances are per step and add up over the trajectory:

- exact orthogonalizers (identity, sign): only op rounding differs (lerp vs a + t(b − a),
  p·(1 − lr·wd) vs p − lr·wd·p): a few fp32 ULPs of |p| per step. We allow 8 ULP of the
  largest magnitude per step: 8·u·max|p|·steps.
- Newton-Schulz / Polar Express in fp32: O differs by at most 2·tol_ns relative Frobenius
  (tolerances.py), so ‖Δp‖_F ≤ Σ_t lr·scale·2·tol_ns·‖O_t‖_F, with ‖O‖_F ≤ 1.2·√min(m,n)
  (σ ≤ 1.2 after NS); NorMuon's rescale is a smooth function of O: ×3 for it.
- Cautious decay flips its mask where O·p ≈ 0; with NS noise (~1e-6 per entry) a flip is
  likely somewhere in a 6-step trajectory and moves one entry by lr·wd·|p|, so cautious decay
  is drawn with the exact orthogonalizers only (where a flip needs |u| < 1e-7).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import jax_reference.optim.adamw as JA
import jax_reference.optim.hybrid as JO
import jax_reference.optim.muon as JM
import torch_impl.orthogonalizers.newton_schulz as TO
from parity_tests.lockstep import lockstep, trajectory_inputs
from parity_tests.tolerances import FP32_UNIT_ROUNDOFF as U
from parity_tests.tolerances import fp32_tolerance
from torch_impl.optim import AdamW, Muon, hybrid
from torch_impl.optim.muon import shape_scale

SHAPES = ((8, 8), (24, 8), (8, 24), (4, 3, 5), (4, 2, 3, 3))


# Test orthogonalizers with the one signature both frameworks call: f(X, *, steps, eps, compute_dtype).
def identity(X, steps, eps, compute_dtype):
    return X


def sign_t(X, steps, eps, compute_dtype):
    return torch.sign(X)


def sign_j(X, steps, eps, compute_dtype):
    return jnp.sign(X)


ORTHS = {  # name: (torch orthogonalizer, jax orthogonalizer, exact?)
    "identity": (identity, identity, True),
    "sign": (sign_t, sign_j, True),
    "newton_schulz": ("newton_schulz", "newton_schulz", False),
    "polar_express": ("polar_express", "polar_express", False),
}


@st.composite
def muon_cases(draw):
    orth = draw(st.sampled_from(sorted(ORTHS)))
    exact = ORTHS[orth][2]
    return dict(
        shapes=draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)),
        steps=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**31 - 1)), orth=orth,
        lr=draw(st.sampled_from((0.02, 0.05))), wd=draw(st.sampled_from((0.0, 0.1, 0.3))),
        momentum=draw(st.sampled_from((0.0, 0.9, 0.95))), nesterov=draw(st.booleans()),
        cautious=draw(st.booleans()) if exact else False,
        normuon=draw(st.sampled_from((None, 0.95))),
        scale=draw(st.sampled_from(("max_ratio", "match_rms_adamw"))))


def muon_tolerance(case, shape):
    rows, cols = shape[0], math.prod(shape[1:])
    rounding = 8 * U * case["steps"] * 4.0  # params stay O(1): |p| ≤ ~4 for N(0,1) draws
    if ORTHS[case["orth"]][2]:
        return rounding
    coeffs = TO.NS5_COEFFS if case["orth"] == "newton_schulz" else TO.POLAR_EXPRESS_COEFFS
    tol_ns = fp32_tolerance(TO.coefficient_schedule(coeffs, 5))
    per_step = case["lr"] * shape_scale(rows, cols, case["scale"]) * 2 * tol_ns * 1.2 * math.sqrt(min(rows, cols))
    return rounding + case["steps"] * per_step * (3 if case["normuon"] else 1)


# Explicit cases so that every option is exercised whatever hypothesis draws (the ci profile's
# derandomized draws change whenever this function's source changes): cautious decay with
# both exact orthogonalizers, NorMuon with each NS schedule.
EXPLICIT = [dict(shapes=[(8, 24), (24, 8)], steps=3, seed=7, orth=orth, lr=0.05, wd=0.3, momentum=0.9,
                 nesterov=True, cautious=ORTHS[orth][2], normuon=None if ORTHS[orth][2] else 0.95,
                 scale=scale)
            for orth in sorted(ORTHS) for scale in ("max_ratio", "match_rms_adamw")]


@given(case=muon_cases())
@example(case=EXPLICIT[0]).via("explicit: identity, cautious, max_ratio")
@example(case=EXPLICIT[1]).via("explicit: identity, cautious, match_rms_adamw")
@example(case=EXPLICIT[-2]).via("explicit: sign, cautious, max_ratio")
@example(case=EXPLICIT[-1]).via("explicit: sign, cautious, match_rms_adamw")
@example(case=EXPLICIT[2]).via("explicit: newton_schulz, normuon")
@example(case=EXPLICIT[4]).via("explicit: polar_express, normuon")
def test_muon_trajectory_torch_equals_jax(case):
    params, grads = trajectory_inputs(case)
    t_orth, j_orth, _ = ORTHS[case["orth"]]
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = Muon(tp, lr=case["lr"], momentum=case["momentum"], nesterov=case["nesterov"],
                orthogonalizer=t_orth, weight_decay=case["wd"],
                cautious_weight_decay=case["cautious"], normuon_beta2=case["normuon"],
                shape_scale=case["scale"], ns_dtype=torch.float32)
    tx = JM.muon(case["lr"], momentum=case["momentum"], nesterov=case["nesterov"],
                 orthogonalizer=j_orth, weight_decay=case["wd"],
                 cautious_weight_decay=case["cautious"], normuon_beta2=case["normuon"],
                 shape_scale=case["scale"], ns_dtype=jnp.float32)
    for t, jp, state in lockstep(topt, tp, tx, params, grads):
        for i, (p, q) in enumerate(zip(tp, jp)):
            tol = muon_tolerance(dict(case, steps=t + 1), p.shape)
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(q), rtol=0, atol=tol,
                                       err_msg=f"param {i} {tuple(p.shape)} after step {t + 1}")
            # Momentum does not depend on O: only lerp rounding, 8 ULP of |g| ≤ ~5 per step.
            np.testing.assert_allclose(
                topt.state[p]["momentum_buffer"].numpy().reshape(p.shape),
                np.asarray(state.momentum[i]), rtol=0, atol=8 * U * 5 * (t + 1))
            if case["normuon"] is not None:
                np.testing.assert_allclose(topt.state[p]["second_moment"].numpy(),
                                           np.asarray(state.second_moment[i]), rtol=1e-4, atol=1e-9)
                # v is an EMA of mean(O²): relative error ≤ 2× that of O (≤ 2·tol_ns ≈ 1.2e-4
                # for PE, u-level for exact orthogonalizers); atol for entries where O ≈ 0


# ---- AdamW --------------------------------------------------------------------------------

@st.composite
def adamw_cases(draw):
    return dict(shapes=draw(st.lists(st.sampled_from(((7,), (8, 8), (3, 4, 5))), min_size=1, max_size=3)),
                steps=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**31 - 1)),
                lr=draw(st.sampled_from((1e-3, 0.01))), wd=draw(st.sampled_from((0.0, 0.01, 0.1))),
                betas=draw(st.sampled_from(((0.9, 0.999), (0.8, 0.95)))),
                eps=draw(st.sampled_from((1e-8, 1e-10))))


@given(case=adamw_cases())
def test_adamw_equals_torch_optim_adamw_bitwise_and_jax_within_bias_correction_rounding(case):
    params, grads = trajectory_inputs(case)
    ours = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    ref = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    kw = dict(lr=case["lr"], betas=case["betas"], eps=case["eps"], weight_decay=case["wd"])
    o1, o2 = AdamW(ours, **kw), torch.optim.AdamW(ref, foreach=True, **kw)
    tx = JA.adamw(case["lr"], *case["betas"], case["eps"], case["wd"])
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)
    b2 = case["betas"][1]
    for t, gs in enumerate(grads):
        for a, b, g in zip(ours, ref, gs):
            a.grad, b.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
        o1.step(), o2.step()
        updates, state = tx.update([jnp.asarray(g) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
        for a, b, q in zip(ours, ref, jp):
            # Same op sequence as torch's foreach AdamW: bit-identical.
            assert torch.equal(a, b)
            # optax forms 1 − β₂ᵗ in fp32 (torch: float64), a relative error ≤ u/(1 − β₂) in
            # the bias correction, halved by the sqrt, on an update of size ≤ lr per entry
            # (|m̂/√v̂| ≤ ~1 for these gradients) — plus op rounding, per step.
            atol = (t + 1) * (case["lr"] * (U / (1 - b2)) + 8 * U * 4)
            np.testing.assert_allclose(a.detach().numpy(), np.asarray(q), rtol=0, atol=atol)


# ---- outside oracles ----------------------------------------------------------------------

def well_conditioned(rng, shape, s_min=0.1):
    m, n = shape
    k = min(m, n)
    Uq, _ = np.linalg.qr(rng.standard_normal((m, k)))
    Vq, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((Uq * rng.uniform(s_min, 1, k)) @ Vq.T).astype(np.float32)


@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(((16, 16), (32, 8), (8, 32))),
       rule=st.sampled_from((("max_ratio", "original"), ("match_rms_adamw", "match_rms_adamw"))),
       nesterov=st.booleans())
def test_one_step_equals_torch_optim_muon(seed, shape, rule, nesterov):
    """torch.optim.Muon runs NS in bf16 with a bf16 norm; ours: bf16 NS with an fp32 norm. The
    momentum math is the same ops (bit-equal); the step differs by the bf16 NS band (4% of
    ‖O‖_F, tolerances.py) times lr·scale — checked in Frobenius norm."""
    rng = np.random.default_rng(seed)
    p0, g = rng.standard_normal(shape).astype(np.float32), well_conditioned(rng, shape)
    ours, theirs = (torch.nn.Parameter(torch.from_numpy(p0.copy())) for _ in range(2))
    ours.grad, theirs.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
    lr, wd = 0.02, 0.1
    Muon([ours], lr=lr, weight_decay=wd, nesterov=nesterov, shape_scale=rule[0],
         ns_dtype=torch.bfloat16).step()
    opt = torch.optim.Muon([theirs], lr=lr, weight_decay=wd, nesterov=nesterov, adjust_lr_fn=rule[1])
    opt.step()
    scale = shape_scale(*shape, rule[0])
    o_norm = 1.2 * math.sqrt(min(shape))
    diff = float(torch.linalg.norm((ours - theirs).detach().double()))
    assert diff <= lr * scale * 2 * 0.04 * o_norm
    # and the step really moved the parameter by ~lr·scale·‖O‖ (the comparison is not vacuous)
    assert float(torch.linalg.norm((ours.detach() - torch.from_numpy(p0 * (1 - lr * wd))).double())) > 0.5 * lr * scale


@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(((16, 16), (32, 8), (8, 32))))
def test_one_step_equals_optax_contrib_muon_at_step_one_only(seed, shape):
    """optax.contrib.muon bias-corrects its Nesterov momentum. At step 1 its direction is ∝ g and
    ours is (1 − μ²)·g: NS is scale invariant, so the first steps agree (fp32 NS tolerance).
    From step 2 the bias correction changes the mix of g and momentum (~10% apart), so only step
    1 is a valid oracle. Layout: torch (out, in) needs reduction_axis=1, output_axis=0."""
    from optax.contrib import MuonDimensionNumbers
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(np.float32)
    g = well_conditioned(rng, shape)
    lr = 0.02
    ours = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ours.grad = torch.from_numpy(g.copy())
    Muon([ours], lr=lr, ns_dtype=torch.float32).step()
    tx = optax.contrib.muon(lr, eps=1e-7, muon_weight_dimension_numbers=MuonDimensionNumbers(
        reduction_axis=1, output_axis=0))
    jp = jnp.asarray(p0)
    updates, _ = tx.update(jnp.asarray(g), tx.init(jp), jp)
    theirs = np.asarray(optax.apply_updates(jp, updates))
    tol = lr * shape_scale(*shape, "max_ratio") * 2 * fp32_tolerance(
        TO.coefficient_schedule(TO.NS5_COEFFS, 5)) * 1.2 * math.sqrt(min(shape))
    assert np.linalg.norm(ours.detach().numpy() - theirs) <= tol + 8 * U * 4 * math.sqrt(p0.size)


# ---- hybrid split -------------------------------------------------------------------------

MODEL = {  # a "model": named tensors with embedding / block-matrix / scalar / head shapes
    "transformer.wte.weight": (50, 16),
    "transformer.h.0.attn.c_q.weight": (16, 16),
    "transformer.h.0.attn.c_proj.weight": (16, 16),
    "transformer.h.0.mlp.c_fc.weight": (64, 16),
    "transformer.h.0.mlp.c_proj.weight": (16, 64),
    "transformer.h.0.gain": (16,),
    "lm_head.weight": (50, 16),
}


@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 4))
def test_hybrid_split_same_trajectory_in_both_frameworks(seed, steps):
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()} for _ in range(steps)]
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    topt = hybrid(tp.items(), model_dim=16, ns_dtype=torch.float32)
    tx = JO.hybrid(init, model_dim=16, ns_dtype=jnp.float32)
    jp = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(jp)
    labels = {k: JO.label_param(k, s) for k, s in MODEL.items()}
    from torch_impl.optim.hybrid import label_param
    assert labels == {k: label_param(k, s) for k, s in MODEL.items()}
    assert sorted(set(labels.values())) == ["embedding", "muon", "scalar", "unembedding"]
    for t, gs in enumerate(grads):
        for k, p in tp.items():
            p.grad = torch.from_numpy(gs[k].copy())
        topt.step()
        updates, state = tx.update({k: jnp.asarray(v) for k, v in gs.items()}, state, jp)
        jp = optax.apply_updates(jp, updates)
        for k in MODEL:
            # Muon entries: NS fp32 bound with lr 0.02, scale ≤ 2, √16 (see module docstring).
            # AdamW entries: bias-correction rounding u/(1 − 0.95) on lr up to 0.5·(16/768)^-½.
            lr_adam = 0.5 * (16 / 768) ** -0.5
            tol = (t + 1) * max(0.02 * 2 * 2 * fp32_tolerance(TO.coefficient_schedule(TO.NS5_COEFFS, 5)) * 1.2 * 4,
                                lr_adam * U / 0.05 + 8 * U * 4 * lr_adam)
            np.testing.assert_allclose(tp[k].detach().numpy(), np.asarray(jp[k]), rtol=0, atol=tol,
                                       err_msg=f"{k} ({labels[k]}) after step {t + 1}")
