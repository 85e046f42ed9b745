"""DistAdamW (ZeRO-2) against AdamW (and the JAX reference) in 1–4 spawned gloo ranks.

Identical data must match bit for bit (tests/dist/common.py: bf16-representable gradients
are averaged exactly; AdamW is elementwise, so a shard's update is the same arithmetic as
the whole parameter's). Different data: AdamW fed the fp32 mean gradient; see
`ADAM_TOLERANCE` for the bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dist.common import U, clone_params, close, exact_randn, make_params, step_identical
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import AdamW
from torch_impl.optim import DistAdamW

F32, BF16 = torch.float32, torch.bfloat16
MIN_NUMEL = 1024
IN_RANKS = settings(derandomize=True, database=None, deadline=None, max_examples=12,
                    suppress_health_check=list(HealthCheck), print_blob=False)
# (2, 600): sharded with dim 0 < N for N ≥ 3; (1500,): sharded 1-D; the rest replicated
SHAPES = [(2, 600), (5, 300), (1500,), (64, 32), (7,), (), (3, 4)]


def check_bitwise(params, ref, opt, ref_opt, what=""):
    ok = all(torch.equal(p, q) for p, q in zip(params, ref))
    for p, q in zip(params, ref):
        rows = opt.placement(p).local_rows(rank())
        if q not in ref_opt.state:
            ok &= p not in opt.state
        elif rows is None:  # replicated: whole state on every rank
            ok &= all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ref_opt.state[q])
        elif rows[1] > rows[0]:  # sharded: this rank's rows of the state
            s, r = opt.state[p], ref_opt.state[q]
            ok &= torch.equal(s["step"], r["step"])
            ok &= all(torch.equal(s[k], r[k][rows[0]:rows[1]]) for k in ("exp_avg", "exp_avg_sq"))
        else:  # owns no rows: no state at all
            ok &= p not in opt.state
    all_ranks_agree(ok, f"DistAdamW != AdamW bitwise {what}")


adam_configs = st.fixed_dictionaries(dict(
    lr=st.sampled_from([1e-3, 0.05]),
    betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
    eps=st.sampled_from([1e-8, 1e-10]),
    weight_decay=st.sampled_from([0.0, 0.1]),
))
param_specs = st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from([F32, BF16])),
                       min_size=1, max_size=8)


def case_identical_data_bitwise(max_examples):
    @settings(IN_RANKS, max_examples=max_examples)
    @given(specs=param_specs, kwargs=adam_configs)
    def body(specs, kwargs):
        params = make_params(specs)
        ref = clone_params(params)
        opt = DistAdamW(params, **kwargs, shard_min_numel=MIN_NUMEL)
        ref_opt = AdamW(ref, **kwargs)
        step_identical(params, ref, opt, ref_opt, steps=3)
        check_bitwise(params, ref, opt, ref_opt, f"{specs} {kwargs}")
    body()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_identical_data_matches_adamw_bitwise(rank_groups, n):
    rank_groups(n).run(case_identical_data_bitwise, 12 if n <= 2 else 6)


def case_edge_shapes():
    cases = {
        "dim 0 smaller than N": [((2, 600), F32), ((1, 2048), F32)],
        "dim 0 not divisible": [((5, 300), F32), ((1500,), BF16)],
        "mixed fp32/bf16, sharded and replicated": [((64, 32), BF16), ((64, 32), F32), ((7,), BF16), ((), F32)],
    }
    for name, specs in cases.items():
        params = make_params(specs)
        ref = clone_params(params)
        opt = DistAdamW(params, lr=0.01, weight_decay=0.1, shard_min_numel=MIN_NUMEL)
        ref_opt = AdamW(ref, lr=0.01, weight_decay=0.1)
        step_identical(params, ref, opt, ref_opt, steps=3)
        check_bitwise(params, ref, opt, ref_opt, name)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_edge_shapes(rank_groups, n):
    rank_groups(n).run(case_edge_shapes)


# Different data. Gradients are g_r = sign pattern + noise with |noise| < 0.5, so every
# element of the mean has |mean| ≥ 0.5 ≥ max|g_r|/3: gloo's sequential fp32 sum and torch's
# mean then differ by ≤ N·u·max|g| ≤ 3N·u relative to the element (AdamW is elementwise and
# a mean near 0 would make the relative difference, and the first-step update g/|g|,
# arbitrary). m and √v inherit ≤ 3N·u relative error, the step lr·m̂/(√v̂+eps) ≤ ~6N·u·lr
# (|m̂/√v̂| ≤ ~1 here), and the errors of earlier steps persist in m and v: per-element
# bound steps·lr·8N·u, plus a few ULPs of |p| ≤ 4 for the rounding of p itself.
def adam_tolerance(n, steps, lr):
    return steps * lr * 8 * n * U + 4 * U * 4 * steps


DIFF_SPECS = [((6, 400), F32), ((1500,), F32), ((7, 3), F32), ((), F32)]
DIFF_KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def rank_grad(shape, t, i, r):
    sign = torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(100 * t + i))) + 0.0
    sign[sign == 0] = 1.0
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(1000 * t + 10 * i + r)) - 0.5
    return sign + noise


def case_different_data(steps):
    n, r = world_size(), rank()
    params = make_params(DIFF_SPECS)
    start = [p.detach().clone() for p in params]
    ref = clone_params(params)
    opt = DistAdamW(params, **DIFF_KW, shard_min_numel=MIN_NUMEL)
    ref_opt = AdamW(ref, **DIFF_KW)
    means = []
    for t in range(steps):
        means.append([])
        for i, (p, q) in enumerate(zip(params, ref)):
            p.grad = rank_grad(p.shape, t, i, r)
            q.grad = torch.stack([rank_grad(p.shape, t, i, s) for s in range(n)]).mean(0)
            means[-1].append(q.grad.clone())
        opt.step()
        ref_opt.step()
    tol = adam_tolerance(n, steps, DIFF_KW["lr"])
    results = [close(p, q, tol) for p, q in zip(params, ref)]
    for p, q in zip(params, ref):  # exp_avg = lerp of mean gradients: rounding only
        rows = opt.placement(p).local_rows(rank())
        if p in opt.state:
            want = ref_opt.state[q]["exp_avg"] if rows is None else ref_opt.state[q]["exp_avg"][rows[0]:rows[1]]
            results.append(close(opt.state[p]["exp_avg"], want, 4 * (n + 1) * U * 2 * steps))
    all_ranks_agree(all(ok for ok, _ in results), f"DistAdamW vs AdamW(mean grad): {results} tol {tol}")
    return dict(start=start, means=means, final=[p.detach().clone() for p in params])


@pytest.mark.parametrize("n", [2, 4])
def test_different_data_matches_mean_gradient(rank_groups, n):
    rank_groups(n).run(case_different_data, 3)


def test_different_data_matches_jax_reference(rank_groups):
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from jax_reference.adamw import adamw as jax_adamw

    n, steps = 3, 3
    out = rank_groups(n).run(case_different_data, steps)[0]
    b1, b2 = DIFF_KW["betas"]
    tx = jax_adamw(DIFF_KW["lr"], b1=b1, b2=b2, eps=DIFF_KW["eps"], weight_decay=DIFF_KW["weight_decay"])
    jp = [jnp.asarray(p.numpy()) for p in out["start"]]
    state = tx.init(jp)
    for gs in out["means"]:
        updates, state = tx.update([jnp.asarray(g.numpy()) for g in gs], state, jp)
        jp = optax.apply_updates(jp, updates)
    # plus optax's fp32 bias correction (jax_reference/adamw.py: ~6e-7 relative for b2 = 0.95)
    tol = adam_tolerance(n, steps, DIFF_KW["lr"]) + steps * DIFF_KW["lr"] * 1e-6
    for p, q in zip(out["final"], jp):
        good, err = close(p, torch.tensor(jnp.asarray(q).tolist()), tol)
        assert good, f"{tuple(p.shape)}: |DistAdamW - jax adamw| = {err:.3g} > {tol:.3g}"


def case_stats():
    n = world_size()
    specs = [((6, 400), F32), ((5, 300), F32), ((7,), F32), ((3, 4), F32)]
    params = make_params(specs)
    opt = DistAdamW(params, shard_min_numel=MIN_NUMEL, track_stats=True)
    for i, p in enumerate(params):
        p.grad = exact_randn(p.shape, 3, i)
    opt.step()
    s = opt.stats
    padded = sum(math.ceil(rows / n) * n * cols * 4 for rows, cols in ((6, 400), (5, 300)))
    ok = n == 1 or (math.isclose(s.bytes_sent["reduce_scatter"], (n - 1) / n * padded)
                    and math.isclose(s.bytes_sent["all_gather"], (n - 1) / n * padded))
    all_ranks_agree(ok, f"stats {s}")
    return s.elements


@pytest.mark.parametrize("n", [1, 3])
def test_stats_match_theory(rank_groups, n):
    elements = rank_groups(n).run(case_stats)
    assert sum(elements) == 6 * 400 + 5 * 300 + n * (7 + 12)  # shards once, small ones N times


def test_no_process_group_is_adamw():
    specs = [((6, 400), F32), ((7,), BF16), ((64, 32), BF16)]
    params = make_params(specs)
    ref = clone_params(params)
    opt, ref_opt = DistAdamW(params, shard_min_numel=MIN_NUMEL), AdamW(ref)
    assert opt.comm.world_size == 1 and opt.placement(params[0]).local_rows(0) is None
    step_identical(params, ref, opt, ref_opt, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(params, ref))


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_identical_data_matches_adamw_bitwise_thorough(rank_groups, n):
    rank_groups(n).run(case_identical_data_bitwise, 100)
