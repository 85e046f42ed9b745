"""DistMuon against Muon (and the JAX reference) in 1–4 spawned gloo ranks.

Case bodies (`case_*`) run inside every rank; see tests/dist/common.py for why identical
data must match bit for bit and for the tolerance of the different-data comparisons."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dist.common import (U, clone_params, close, exact_randn, make_params,
                               mean_grad_param_tolerance, step_identical)
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import DistMuon
from torch_impl.optim import Muon

WORLD_SIZES = [1, 2, 3, 4]
F32, BF16 = torch.float32, torch.bfloat16

# Inside ranks: derandomized so every rank draws the same examples in the same order.
IN_RANKS = settings(derandomize=True, database=None, deadline=None, max_examples=12,
                    suppress_health_check=list(HealthCheck), print_blob=False)

SHAPES = [(8, 8), (16, 8), (8, 24), (32, 1), (4, 2, 3)]


def run_pair(specs, kwargs, steps, grad_key):
    """DistMuon and Muon from the same start; grad_key(t, i) gives the gradient of step t,
    param i on this rank (Muon gets `reference_grad`). Returns (dist, ref) params and opts."""
    params = make_params(specs)
    ref = clone_params(params)
    opt, ref_opt = DistMuon(params, **kwargs), Muon(ref, **kwargs)
    return params, ref, opt, ref_opt


def check_bitwise(params, ref, opt, ref_opt, what=""):
    ok = all(torch.equal(p, q) for p, q in zip(params, ref))
    # state exists only on the owner, and there it equals Muon's
    for p, q in zip(params, ref):
        if opt.placement(p).holds(rank()) and q in ref_opt.state:
            ok &= all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ref_opt.state[q])
        else:
            ok &= p not in opt.state
    all_ranks_agree(ok, f"DistMuon != Muon bitwise {what}")


muon_configs = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.02, 0.1]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    cautious_weight_decay=st.booleans(),
    normuon_beta2=st.sampled_from([None, 0.95]),
    orthogonalizer=st.sampled_from(["newton_schulz", "polar_express"]),
    shape_scale=st.sampled_from(["max_ratio", "match_rms_adamw"]),
    ns_dtype=st.sampled_from([F32, BF16]),
))
param_specs = st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from([F32, BF16])),
                       min_size=1, max_size=9)


def case_identical_data_bitwise(max_examples):
    @settings(IN_RANKS, max_examples=max_examples)
    @given(specs=param_specs, kwargs=muon_configs)
    def body(specs, kwargs):
        params, ref, opt, ref_opt = run_pair(specs, kwargs, 2, None)
        step_identical(params, ref, opt, ref_opt, steps=2)
        check_bitwise(params, ref, opt, ref_opt, f"{specs} {kwargs}")
    body()


def examples(n: int) -> int:
    """Fewer examples where ranks outnumber the 2 cores (a collective then costs ~5 ms)."""
    return 12 if n <= 2 else 6


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_identical_data_matches_muon_bitwise(rank_groups, n):
    rank_groups(n).run(case_identical_data_bitwise, examples(n))


EDGE_CASES = {
    "fewer matrices than ranks": [((8, 8), F32)],
    "count not divisible": [((8, 8), F32)] * 5,
    "32x1 matrices": [((32, 1), F32)] * 2 + [((1, 32), F32)],
    "mixed fp32 and bf16": [((16, 8), F32), ((16, 8), BF16), ((16, 8), F32), ((8, 24), BF16)] * 2,
    "N-D": [((4, 2, 3), F32)] * 3,
}


def case_edge_shapes():
    for name, specs in EDGE_CASES.items():
        params, ref, opt, ref_opt = run_pair(specs, dict(ns_dtype=F32, normuon_beta2=0.95), 3, None)
        step_identical(params, ref, opt, ref_opt, steps=3)
        check_bitwise(params, ref, opt, ref_opt, name)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_edge_shapes(rank_groups, n):
    rank_groups(n).run(case_edge_shapes)


def case_missing_grads_everywhere():
    """A parameter without a gradient on every rank is skipped, as in Muon, and ownership
    does not move (its state stays where it was)."""
    specs = [((8, 8), F32)] * 5
    params, ref, opt, ref_opt = run_pair(specs, dict(ns_dtype=F32), 3, None)
    for t in range(3):
        for i, (p, q) in enumerate(zip(params, ref)):
            skip = (t == 1 and i in (0, 3))
            g = None if skip else exact_randn(p.shape, 7, t, i)
            p.grad, q.grad = (None, None) if skip else (g.clone(), g.clone())
        opt.step()
        ref_opt.step()
    check_bitwise(params, ref, opt, ref_opt, "with missing gradients")


@pytest.mark.parametrize("n", [3])
def test_missing_grads_on_every_rank(rank_groups, n):
    rank_groups(n).run(case_missing_grads_everywhere)


DIFF_SPECS = [((16, 8), F32), ((16, 8), F32), ((8, 24), F32), ((32, 1), F32), ((4, 2, 3), F32)]
DIFF_KW = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, cautious_weight_decay=True,
               normuon_beta2=0.95, ns_dtype=F32)


def rank_grads(shape, t, i, r):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * t + 10 * i + r))


def case_different_data(steps):
    """Each rank feeds its own gradients; compare with Muon fed their fp32 mean."""
    n, r = world_size(), rank()
    params = make_params(DIFF_SPECS)
    start = [p.detach().clone() for p in params]
    ref = clone_params(params)
    opt, ref_opt = DistMuon(params, **DIFF_KW), Muon(ref, **DIFF_KW)
    means = []
    for t in range(steps):
        step_means = []
        for i, (p, q) in enumerate(zip(params, ref)):
            p.grad = rank_grads(p.shape, t, i, r)
            q.grad = torch.stack([rank_grads(p.shape, t, i, s) for s in range(n)]).mean(0)
            step_means.append(q.grad.clone())
        means.append(step_means)
        opt.step()
        ref_opt.step()
    ok, errs = True, []
    for p, q in zip(params, ref):
        good, err = close(p, q, mean_grad_param_tolerance(p.shape, n, steps, DIFF_KW["lr"], normuon=True))
        ok &= good
        errs.append(err)
        if opt.placement(p).holds(r):  # momentum: (1-μ)-weighted mean gradients, rounding only
            good, err = close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                              4 * (n + 1) * U * 5 * steps)
            ok &= good
    all_ranks_agree(ok, f"DistMuon vs Muon(mean grad): max errors {errs}")
    return dict(start=start, means=means, final=[p.detach().clone() for p in params]) if r == 0 else errs


@pytest.mark.parametrize("n", [2, 3, 4])
def test_different_data_matches_mean_gradient(rank_groups, n):
    rank_groups(n).run(case_different_data, 3)


def test_different_data_matches_jax_reference(rank_groups):
    """The same run at N=3 against jax_reference.muon fed the fp32 mean gradients."""
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from jax_reference.muon import muon as jax_muon

    n, steps = 3, 3
    out = rank_groups(n).run(case_different_data, steps)[0]
    kw = {k: v for k, v in DIFF_KW.items() if k not in ("lr", "ns_dtype")}
    tx = jax_muon(DIFF_KW["lr"], **kw, ns_steps=5, orthogonalizer="newton_schulz",
                  shape_scale="max_ratio", ns_dtype=jnp.float32)
    jp = [jnp.asarray(p.numpy()) for p in out["start"]]
    state = tx.init(jp)
    for gs in out["means"]:
        updates, state = tx.update([jnp.asarray(g.numpy()) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
    for p, q in zip(out["final"], jp):
        # tolerance: the mean-gradient bound plus torch-vs-JAX fp32 NS rounding (same order)
        tol = 2 * mean_grad_param_tolerance(p.shape, n, steps, DIFF_KW["lr"], normuon=True)
        good, err = close(p, torch.from_numpy(jnp.asarray(q).__array__().copy()), tol)
        assert good, f"{tuple(p.shape)}: |DistMuon - jax muon| = {err:.3g} > {tol:.3g}"


def case_stats():
    """Bytes and orthogonalization work against the theory: 2(N-1)/N of the (padded) stack
    bytes over reduce_scatter + all_gather, ceil(K/N) matrices per stack on each rank."""
    n = world_size()
    specs = [((16, 8), F32)] * 8 + [((8, 24), F32)] * 5
    params = make_params(specs)
    opt = DistMuon(params, ns_dtype=F32, track_stats=True)
    for i, p in enumerate(params):
        p.grad = exact_randn(p.shape, 3, i)
    opt.step()
    s = opt.stats
    padded = sum(math.ceil(k / n) * n * math.prod(shape) * 4 for shape, k in (((16, 8), 8), ((8, 24), 5)))
    expect = (n - 1) / n * padded
    ok = (math.isclose(s.bytes_sent.get("reduce_scatter", 0), expect)
          and math.isclose(s.bytes_sent.get("all_gather", 0), expect)
          and s.steps == 1)
    all_ranks_agree(ok, f"stats {s} vs expected {expect} per kind")
    return s.matrices


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_stats_match_theory(rank_groups, n):
    matrices = rank_groups(n).run(case_stats)
    assert sum(matrices) == 13
    assert max(matrices) == math.ceil(8 / n) + math.ceil(5 / n)


def test_no_process_group_is_muon():
    """Without torch.distributed initialized, DistMuon is Muon (this runs in pytest's process)."""
    specs = [((16, 8), F32)] * 3 + [((8, 24), BF16)]
    params, ref, opt, ref_opt = run_pair(specs, dict(ns_dtype=F32, normuon_beta2=0.9), 3, None)
    assert opt.comm.world_size == 1
    step_identical(params, ref, opt, ref_opt, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(params, ref))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
               for p, q in zip(params, ref))


@pytest.mark.slow
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_identical_data_matches_muon_bitwise_thorough(rank_groups, n):
    rank_groups(n).run(case_identical_data_bitwise, 100)


def case_d12_layer_shapes():
    """One d12 layer's stacks (4 × 768², 3072×768, 768×3072): the reference Muon runs on
    rank 0 only and is broadcast (four copies would time-share the 2 cores)."""
    specs = [((768, 768), F32)] * 4 + [((3072, 768), F32), ((768, 3072), F32)]
    params = make_params(specs)
    ref = clone_params(params)
    opt, ref_opt = DistMuon(params, ns_dtype=F32), Muon(ref, ns_dtype=F32)
    for t in range(2):
        for i, (p, q) in enumerate(zip(params, ref)):
            p.grad = exact_randn(p.shape, 1, t, i)
            q.grad = p.grad.clone()
        opt.step()
        if rank() == 0:
            ref_opt.step()
    for q in ref:
        torch.distributed.broadcast(q.data, 0)
    all_ranks_agree(all(torch.equal(p, q) for p, q in zip(params, ref)), "d12 layer != Muon")


@pytest.mark.slow
def test_d12_layer_shapes_bitwise(rank_groups):
    rank_groups(4).run(case_d12_layer_shapes, timeout=600)
