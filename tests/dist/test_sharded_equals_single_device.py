"""DistMuon and DistAdamW against their single-device optimizers in 1–4 spawned gloo ranks.

One table, `KINDS`: a row per optimizer kind (its Dist/single-device constructor pair, the
hyperparameter and shape strategies, its edge cases, its different-data tolerances and its
statistics), and one set of tests that runs every row:

- identical data on every rank: bit for bit the single-device optimizer, parameters and state
  (each rank holds the state that `opt.placement(p)` gives it, nothing else);
- edge shapes (fewer matrices or rows than ranks, counts not divisible, mixed dtypes);
- a parameter without a gradient on every rank in one step (skipped; state does not move);
- bytes and work per rank against the theory;
- no process group: the Dist class is the single-device optimizer;
- different data per rank: the single-device optimizer fed the fp32 mean gradient, within
  a derived bound (the same runs against the JAX reference: parity_tests/test_distributed_parity.py).

Case bodies (`case_*`) run inside every rank and take the row's name (the rows hold
strategies and functions, which do not travel to the ranks). Why identical data must match
bit for bit, and the Muon different-data bound: tests/dist/common.py; AdamW's: `adam_tolerance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dist.common import (
    U,
    clone_params,
    close,
    exact_randn,
    make_params,
    mean_grad_param_tolerance,
    step_identical,
)
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import AdamW, DistAdamW, DistMuon, Muon

F32, BF16 = torch.float32, torch.bfloat16

# Inside ranks: derandomized so every rank draws the same examples in the same order.
IN_RANKS = settings(derandomize=True, database=None, deadline=None, max_examples=12,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@dataclass(frozen=True)
class Kind:
    """One optimizer kind: everything the shared tests need to know about it."""

    name: str
    dist_cls: type
    single_cls: type
    dist_kwargs: dict                 # constructor arguments of the Dist class only
    configs: st.SearchStrategy        # hyperparameters (keyword arguments of both classes)
    param_specs: st.SearchStrategy    # lists of (shape, dtype)
    identical_steps: int              # steps of the identical-data runs
    edge_cases: dict                  # name -> [(shape, dtype)]
    edge_kwargs: dict
    missing_grad_specs: list          # 5 parameters; 0 and 3 miss their gradient at step 1
    missing_grad_kwargs: dict
    # different data per rank
    diff_specs: list
    diff_kwargs: dict
    rank_grad: Callable               # (shape, step, param index, rank) -> this rank's gradient
    param_tolerance: Callable         # (shape, N, steps) -> elementwise bound on the parameters
    first_moment: str                 # the state entry compared, with its own bound:
    moment_tolerance: Callable        # (N, steps) -> elementwise bound
    # statistics: run one step of `stats_specs`, check bytes in the ranks, work per rank outside
    stats_specs: list
    stats_kwargs: dict
    stats_bytes_ok: Callable          # (stats, N) -> (ok, expected)
    stats_work: Callable              # stats -> this rank's work (returned to pytest)
    stats_work_ok: Callable           # ([work per rank], N) -> bool
    no_group_specs: list
    no_group_kwargs: dict

    def make(self, params, ref, kwargs):
        """The Dist optimizer on `params` and the single-device one on their copies `ref`."""
        return self.dist_cls(params, **kwargs, **self.dist_kwargs), self.single_cls(ref, **kwargs)


# ---- Muon ----------------------------------------------------------------------------------

MUON_SHAPES = [(8, 8), (16, 8), (8, 24), (32, 1), (4, 2, 3)]


def muon_rank_grad(shape, t, i, r):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * t + 10 * i + r))


def muon_stats_bytes(s, n):
    """2(N-1)/N of the (padded) stack bytes over reduce_scatter + all_gather."""
    padded = sum(math.ceil(k / n) * n * math.prod(shape) * 4 for shape, k in (((16, 8), 8), ((8, 24), 5)))
    expect = (n - 1) / n * padded
    ok = (math.isclose(s.bytes_sent.get("reduce_scatter", 0), expect)
          and math.isclose(s.bytes_sent.get("all_gather", 0), expect)
          and s.steps == 1)
    return ok, expect


# Matrices per rank for 8 of (16, 8) (ns_cost 5·8²·40 = 12800) and 5 of (8, 24) (5·8²·56 = 17920),
# by hand from placement.owner_counts' rule: the dearer stack first, each rank ⌊K/N⌋ of a stack,
# the K mod N extras to the least-loaded ranks (ties: lowest). N = 4 splits the 5-stack 2/1/1/1
# where the count split gave 2/2/1/0.
MUON_STATS_PER_RANK = {1: [13], 2: [3 + 4, 2 + 4], 3: [2 + 3, 2 + 2, 1 + 3], 4: [2 + 2, 1 + 2, 1 + 2, 1 + 2]}


def muon_stats_work(matrices, n):
    """ceil(K/N) or floor(K/N) matrices per stack on each rank, as MUON_STATS_PER_RANK."""
    return matrices == MUON_STATS_PER_RANK[n] and max(matrices) <= math.ceil(8 / n) + math.ceil(5 / n)


MUON_DIFF_KW = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, cautious_weight_decay=True,
                    normuon_beta2=0.95, ns_dtype=F32)

MUON = Kind(
    name="muon", dist_cls=DistMuon, single_cls=Muon, dist_kwargs={},
    configs=st.fixed_dictionaries(dict(
        lr=st.sampled_from([0.02, 0.1]),
        nesterov=st.booleans(),
        weight_decay=st.sampled_from([0.0, 0.1]),
        cautious_weight_decay=st.booleans(),
        normuon_beta2=st.sampled_from([None, 0.95]),
        orthogonalizer=st.sampled_from(["newton_schulz", "polar_express"]),
        shape_scale=st.sampled_from(["max_ratio", "match_rms_adamw"]),
        ns_dtype=st.sampled_from([F32, BF16]),
    )),
    param_specs=st.lists(st.tuples(st.sampled_from(MUON_SHAPES), st.sampled_from([F32, BF16])),
                         min_size=1, max_size=9),
    identical_steps=2,
    edge_cases={
        "fewer matrices than ranks": [((8, 8), F32)],
        "count not divisible": [((8, 8), F32)] * 5,
        "32x1 matrices": [((32, 1), F32)] * 2 + [((1, 32), F32)],
        "mixed fp32 and bf16": [((16, 8), F32), ((16, 8), BF16), ((16, 8), F32), ((8, 24), BF16)] * 2,
        "N-D": [((4, 2, 3), F32)] * 3,
    },
    edge_kwargs=dict(ns_dtype=F32, normuon_beta2=0.95),
    missing_grad_specs=[((8, 8), F32)] * 5,
    missing_grad_kwargs=dict(ns_dtype=F32),
    diff_specs=[((16, 8), F32), ((16, 8), F32), ((8, 24), F32), ((32, 1), F32), ((4, 2, 3), F32)],
    diff_kwargs=MUON_DIFF_KW,
    rank_grad=muon_rank_grad,
    param_tolerance=lambda shape, n, steps: mean_grad_param_tolerance(shape, n, steps, MUON_DIFF_KW["lr"],
                                                                      normuon=True),
    # momentum: (1-μ)-weighted mean gradients, rounding only
    first_moment="momentum_buffer",
    moment_tolerance=lambda n, steps: 4 * (n + 1) * U * 5 * steps,
    stats_specs=[((16, 8), F32)] * 8 + [((8, 24), F32)] * 5,
    stats_kwargs=dict(ns_dtype=F32),
    stats_bytes_ok=muon_stats_bytes,
    stats_work=lambda s: s.matrices,
    stats_work_ok=muon_stats_work,
    no_group_specs=[((16, 8), F32)] * 3 + [((8, 24), BF16)],
    no_group_kwargs=dict(ns_dtype=F32, normuon_beta2=0.9),
)


# ---- AdamW (ZeRO-2) ------------------------------------------------------------------------
# Identical data must match bit for bit (tests/dist/common.py: bf16-representable gradients
# are averaged exactly; AdamW is elementwise, so a shard's update is the same arithmetic as
# the whole parameter's).

MIN_NUMEL = 1024
# (2, 600): sharded with dim 0 < N for N ≥ 3; (1500,): sharded 1-D; the rest replicated
ADAMW_SHAPES = [(2, 600), (5, 300), (1500,), (64, 32), (7,), (), (3, 4)]


# Different data. Gradients are g_r = sign pattern + noise with |noise| < 0.5, so every
# element of the mean has |mean| ≥ 0.5 ≥ max|g_r|/3: gloo's sequential fp32 sum and torch's
# mean then differ by ≤ N·u·max|g| ≤ 3N·u relative to the element (AdamW is elementwise and
# a mean near 0 would make the relative difference, and the first-step update g/|g|,
# arbitrary). m and √v inherit ≤ 3N·u relative error, the step lr·m̂/(√v̂+eps) ≤ ~6N·u·lr
# (|m̂/√v̂| ≤ ~1 here), and the errors of earlier steps persist in m and v: per-element
# bound steps·lr·8N·u, plus a few ULPs of |p| ≤ 4 for the rounding of p itself.
def adam_tolerance(n, steps, lr):
    return steps * lr * 8 * n * U + 4 * U * 4 * steps


def adamw_rank_grad(shape, t, i, r):
    sign = torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(100 * t + i))) + 0.0
    sign[sign == 0] = 1.0
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(1000 * t + 10 * i + r)) - 0.5
    return sign + noise


def adamw_stats_bytes(s, n):
    padded = sum(math.ceil(rows / n) * n * cols * 4 for rows, cols in ((6, 400), (5, 300)))
    expect = (n - 1) / n * padded
    ok = n == 1 or (math.isclose(s.bytes_sent["reduce_scatter"], expect)
                    and math.isclose(s.bytes_sent["all_gather"], expect))
    return ok, expect


def adamw_stats_work(elements, n):
    return sum(elements) == 6 * 400 + 5 * 300 + n * (7 + 12)  # shards once, small ones N times


ADAMW_DIFF_KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)

ADAMW = Kind(
    name="adamw", dist_cls=DistAdamW, single_cls=AdamW, dist_kwargs=dict(shard_min_numel=MIN_NUMEL),
    configs=st.fixed_dictionaries(dict(
        lr=st.sampled_from([1e-3, 0.05]),
        betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
        eps=st.sampled_from([1e-8, 1e-10]),
        weight_decay=st.sampled_from([0.0, 0.1]),
    )),
    param_specs=st.lists(st.tuples(st.sampled_from(ADAMW_SHAPES), st.sampled_from([F32, BF16])),
                         min_size=1, max_size=8),
    identical_steps=3,
    edge_cases={
        "dim 0 smaller than N": [((2, 600), F32), ((1, 2048), F32)],
        "dim 0 not divisible": [((5, 300), F32), ((1500,), BF16)],
        "mixed fp32/bf16, sharded and replicated": [((64, 32), BF16), ((64, 32), F32), ((7,), BF16), ((), F32)],
    },
    edge_kwargs=dict(lr=0.01, weight_decay=0.1),
    missing_grad_specs=[((2, 600), F32), ((5, 300), F32), ((7,), F32), ((64, 32), BF16), ((), F32)],
    missing_grad_kwargs=dict(lr=0.01, weight_decay=0.1),
    diff_specs=[((6, 400), F32), ((1500,), F32), ((7, 3), F32), ((), F32)],
    diff_kwargs=ADAMW_DIFF_KW,
    rank_grad=adamw_rank_grad,
    param_tolerance=lambda shape, n, steps: adam_tolerance(n, steps, ADAMW_DIFF_KW["lr"]),
    # exp_avg = lerp of mean gradients: rounding only
    first_moment="exp_avg",
    moment_tolerance=lambda n, steps: 4 * (n + 1) * U * 2 * steps,
    stats_specs=[((6, 400), F32), ((5, 300), F32), ((7,), F32), ((3, 4), F32)],
    stats_kwargs=dict(shard_min_numel=MIN_NUMEL),
    stats_bytes_ok=adamw_stats_bytes,
    stats_work=lambda s: s.elements,
    stats_work_ok=adamw_stats_work,
    no_group_specs=[((6, 400), F32), ((7,), BF16), ((64, 32), BF16)],
    no_group_kwargs={},
)

KINDS = {kind.name: kind for kind in (MUON, ADAMW)}
WORLD_SIZES = [1, 2, 3, 4]


def cases(world_sizes):
    """(kind name, N) for every row at each world size, with ids such as "muon-N2"."""
    return [pytest.param(name, n, id=f"{name}-N{n}") for name in KINDS for n in world_sizes]


# ---- state comparison through placements --------------------------------------------------

def local_state(opt, p, ref_state: dict) -> dict:
    """The part of the single-device state `ref_state` of `p` that this rank must hold:
    everything for a Replicated or Owned placement; for Rows, this rank's rows of every entry
    shaped like the parameter (0-d entries such as step counts whole)."""
    rows = opt.placement(p).local_rows(rank())
    if rows is None:
        return ref_state
    return {k: v[rows[0]:rows[1]] if v.shape == p.shape else v for k, v in ref_state.items()}


def state_matches(opt, ref_opt, p, q) -> bool:
    """Bitwise: this rank holds exactly its placement's part of the single-device state."""
    if q not in ref_opt.state or not opt.placement(p).holds(rank()):
        return p not in opt.state
    want = local_state(opt, p, ref_opt.state[q])
    got = opt.state.get(p, {})
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def check_bitwise(params, ref, opt, ref_opt, what=""):
    ok = all(torch.equal(p, q) for p, q in zip(params, ref))
    ok &= all(state_matches(opt, ref_opt, p, q) for p, q in zip(params, ref))
    all_ranks_agree(ok, f"{opt.__class__.__name__} != {ref_opt.__class__.__name__} bitwise {what}")


# ---- identical data: bit for bit ----------------------------------------------------------

def case_identical_data_bitwise(kind_name, max_examples):
    kind = KINDS[kind_name]

    @settings(IN_RANKS, max_examples=max_examples)
    @given(specs=kind.param_specs, kwargs=kind.configs)
    def body(specs, kwargs):
        params = make_params(specs)
        ref = clone_params(params)
        opt, ref_opt = kind.make(params, ref, kwargs)
        step_identical(params, ref, opt, ref_opt, steps=kind.identical_steps)
        check_bitwise(params, ref, opt, ref_opt, f"{specs} {kwargs}")
    body()


def examples(n: int) -> int:
    """Fewer examples where ranks outnumber the 2 cores (a collective then costs ~5 ms)."""
    return 12 if n <= 2 else 6


@pytest.mark.parametrize("kind,n", cases(WORLD_SIZES))
def test_identical_data_bitwise(rank_groups, kind, n):
    rank_groups(n).run(case_identical_data_bitwise, kind, examples(n))


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", cases(WORLD_SIZES))
def test_identical_data_bitwise_thorough(rank_groups, kind, n):
    rank_groups(n).run(case_identical_data_bitwise, kind, 100)


def case_edge_shapes(kind_name):
    kind = KINDS[kind_name]
    for name, specs in kind.edge_cases.items():
        params = make_params(specs)
        ref = clone_params(params)
        opt, ref_opt = kind.make(params, ref, kind.edge_kwargs)
        step_identical(params, ref, opt, ref_opt, steps=3)
        check_bitwise(params, ref, opt, ref_opt, name)


@pytest.mark.parametrize("kind,n", cases([2, 3, 4]))
def test_edge_shapes(rank_groups, kind, n):
    rank_groups(n).run(case_edge_shapes, kind)


def case_missing_grads_everywhere(kind_name):
    """A parameter without a gradient on every rank is skipped, as in the single-device
    optimizer, and its placement does not move (its state stays where it was)."""
    kind = KINDS[kind_name]
    params = make_params(kind.missing_grad_specs)
    ref = clone_params(params)
    opt, ref_opt = kind.make(params, ref, kind.missing_grad_kwargs)
    for t in range(3):
        for i, (p, q) in enumerate(zip(params, ref)):
            skip = (t == 1 and i in (0, 3))
            g = None if skip else exact_randn(p.shape, 7, t, i, dtype=p.dtype)
            p.grad, q.grad = (None, None) if skip else (g.clone(), g.clone())
        opt.step()
        ref_opt.step()
    check_bitwise(params, ref, opt, ref_opt, "with missing gradients")


@pytest.mark.parametrize("kind,n", cases([3]))
def test_missing_grads_on_every_rank(rank_groups, kind, n):
    rank_groups(n).run(case_missing_grads_everywhere, kind)


# ---- statistics --------------------------------------------------------------------------

def case_stats(kind_name):
    """Bytes and work against the theory: 2(N-1)/N of the (padded) sharded bytes over
    reduce_scatter + all_gather; each rank's share of the work."""
    kind = KINDS[kind_name]
    n = world_size()
    params = make_params(kind.stats_specs)
    opt = kind.dist_cls(params, **kind.stats_kwargs, track_stats=True)
    for i, p in enumerate(params):
        p.grad = exact_randn(p.shape, 3, i)
    opt.step()
    s = opt.stats
    ok, expect = kind.stats_bytes_ok(s, n)
    all_ranks_agree(ok, f"stats {s} vs expected {expect} per kind")
    # one rank: every collective is skipped, not run on a group of one
    all_ranks_agree(n > 1 or s.calls == {}, f"collectives launched at N = 1: {s.calls}")
    return kind.stats_work(s)


@pytest.mark.parametrize("kind,n", cases(WORLD_SIZES))
def test_stats_match_theory(rank_groups, kind, n):
    work = rank_groups(n).run(case_stats, kind)
    assert KINDS[kind].stats_work_ok(work, n), work


# ---- no process group ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_process_group_is_the_single_device_optimizer(kind):
    """Without torch.distributed initialized, the Dist class is the single-device optimizer
    (this runs in pytest's process): everything Replicated, the same steps bit for bit."""
    kind = KINDS[kind]
    params = make_params(kind.no_group_specs)
    ref = clone_params(params)
    opt, ref_opt = kind.make(params, ref, kind.no_group_kwargs)
    assert opt.comm.world_size == 1
    assert all(opt.placement(p).holds(0) and opt.placement(p).local_rows(0) is None for p in params)
    step_identical(params, ref, opt, ref_opt, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(params, ref))
    assert all(state_matches(opt, ref_opt, p, q) for p, q in zip(params, ref))


# ---- different data per rank: the single-device optimizer fed the mean gradient ----------

def case_different_data(kind_name, steps):
    """Each rank feeds its own gradients; compare with the single-device optimizer fed their
    fp32 mean. Rank 0 returns the start, the mean gradients and the final parameters (for
    the JAX comparison in parity_tests/test_distributed_parity.py)."""
    kind = KINDS[kind_name]
    n, r = world_size(), rank()
    params = make_params(kind.diff_specs)
    start = [p.detach().clone() for p in params]
    ref = clone_params(params)
    opt, ref_opt = kind.make(params, ref, kind.diff_kwargs)
    means = []
    for t in range(steps):
        step_means = []
        for i, (p, q) in enumerate(zip(params, ref)):
            p.grad = kind.rank_grad(p.shape, t, i, r)
            q.grad = torch.stack([kind.rank_grad(p.shape, t, i, s) for s in range(n)]).mean(0)
            step_means.append(q.grad.clone())
        means.append(step_means)
        opt.step()
        ref_opt.step()
    results = [close(p, q, kind.param_tolerance(p.shape, n, steps)) for p, q in zip(params, ref)]
    for p, q in zip(params, ref):
        if opt.placement(p).holds(r):
            want = local_state(opt, p, ref_opt.state[q])[kind.first_moment]
            results.append(close(opt.state[p][kind.first_moment], want, kind.moment_tolerance(n, steps)))
    all_ranks_agree(all(ok for ok, _ in results),
                    f"{opt.__class__.__name__} vs {ref_opt.__class__.__name__}(mean grad): (ok, max error) {results}")
    return dict(start=start, means=means, final=[p.detach().clone() for p in params]) if r == 0 else None


@pytest.mark.parametrize("kind,n", cases([2, 3, 4]))
def test_different_data_matches_mean_gradient(rank_groups, kind, n):
    rank_groups(n).run(case_different_data, kind, 3)


# ---- a d12 layer (Muon only) ---------------------------------------------------------------

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
