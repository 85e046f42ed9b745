"""torch_impl.sharding.placement: where each parameter's work and state live at N ranks.

The sharded optimizers (tests/dist) rely on these splits being exactly torch.chunk's (and
DTensor Shard(0)'s) uneven split: c = ceil(n/N) per rank, the last ranks possibly short or
empty. Pure functions of sizes, so hypothesis draws the sizes (N up to 9, past the 4 ranks
the distributed tests can afford)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_impl.sharding.placement import (
    Owned,
    Replicated,
    Rows,
    chunk_rows,
    muon_layouts,
    ns_cost,
    owner_counts,
    owner_loads,
    row_placements,
    same_shape_stacks,
)

world_sizes = st.integers(1, 9)
row_counts = st.integers(0, 40)


def chunk_sizes(n_rows: int, world_size: int) -> list[int]:
    """Row counts of torch.chunk(rows, N) (fewer than N pieces when rows run out; none for 0)."""
    return [len(piece) for piece in torch.arange(n_rows).chunk(world_size)] if n_rows else []


# ---- chunk_rows / Rows.local_rows --------------------------------------------

@given(n_rows=row_counts, world_size=world_sizes)
def test_chunk_rows_is_ceil_n_over_N_and_at_least_one(n_rows, world_size):
    c = chunk_rows(n_rows, world_size)
    assert c == max(1, math.ceil(n_rows / world_size))
    assert c * world_size >= n_rows  # padding to c·N rows covers every row


@given(n_rows=row_counts, world_size=world_sizes)
def test_rows_partition_0_to_n_in_rank_order_as_torch_chunk_does(n_rows, world_size):
    place = Rows(n_rows, chunk_rows(n_rows, world_size))
    ranges = [place.local_rows(r) for r in range(world_size)]
    # disjoint, contiguous, in rank order, covering [0, n_rows) exactly
    assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
    assert all(start <= end for start, end in ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # the same sizes as torch.chunk, then empty ranks (n_rows < N, or N not dividing n_rows)
    sizes = [end - start for start, end in ranges]
    pieces = chunk_sizes(n_rows, world_size)
    assert sizes[:len(pieces)] == pieces and not any(sizes[len(pieces):])
    assert [place.holds(r) for r in range(world_size)] == [s > 0 for s in sizes]


@pytest.mark.parametrize("n_rows, world_size, expected", [
    (10, 4, [(0, 3), (3, 6), (6, 9), (9, 10)]),    # not divisible: the last rank is short
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),      # fewer rows than ranks: the last ranks are empty
    (9, 4, [(0, 3), (3, 6), (6, 9), (9, 9)]),      # ceil(9/4) = 3: rank 3 gets nothing (torch.chunk: 3 pieces)
    (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    (5, 1, [(0, 5)]),
])
def test_rows_examples(n_rows, world_size, expected):
    assert [Rows(n_rows, chunk_rows(n_rows, world_size)).local_rows(r) for r in range(world_size)] == expected


def test_replicated_and_owned():
    assert all(Replicated().holds(r) and Replicated().local_rows(r) is None for r in range(4))
    assert [Owned(2).holds(r) for r in range(4)] == [False, False, True, False]
    assert Owned(2).local_rows(2) is None


# ---- same_shape_stacks (Muon) -------------------------------------------

SHAPES = [(4, 4), (8, 4), (4, 2, 2)]
DTYPES = [torch.float32, torch.bfloat16]


@given(specs=st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES)), max_size=12))
def test_same_shape_stacks_group_by_shape_and_dtype_in_first_seen_order(specs):
    params = [torch.zeros(shape, dtype=dtype) for shape, dtype in specs]
    stacks = same_shape_stacks(params)
    keys = [(tuple(s[0].shape), s[0].dtype) for s in stacks]
    assert keys == list(dict.fromkeys((tuple(p.shape), p.dtype) for p in params))  # first-seen order
    assert all(all(p.shape == s[0].shape and p.dtype == s[0].dtype for p in s) for s in stacks)
    # every parameter exactly once, and within a stack in the order given
    assert sorted(id(p) for s in stacks for p in s) == sorted(id(p) for p in params)
    order = {id(p): i for i, p in enumerate(params)}
    assert all([order[id(p)] for p in s] == sorted(order[id(p)] for p in s) for s in stacks)


# ---- owner_counts / muon_layouts (Muon owners by Newton-Schulz cost) -----------------------

def test_ns_cost_is_steps_s2_2l_plus_s():
    assert ns_cost((768, 3072)) == 5 * 768**2 * (2 * 3072 + 768)
    assert ns_cost((3072, 768)) == ns_cost((768, 3072))  # orientation-free
    assert ns_cost((4, 2, 3), steps=2) == 2 * 4**2 * (2 * 6 + 4)  # N-D: (shape[0], rest)


def layouts_for(sizes_and_shapes, world_size, steps=5):
    stacks = [(0, [torch.zeros(shape) for _ in range(k)]) for k, shape in sizes_and_shapes]
    return stacks, *muon_layouts(stacks, world_size, [steps])


stack_specs = st.lists(st.tuples(st.integers(1, 12), st.sampled_from([(4, 4), (8, 4), (4, 16), (16, 16)])),
                       min_size=1, max_size=5)


@given(specs=stack_specs, world_size=world_sizes)
def test_each_rank_owns_floor_or_ceil_of_each_stack_as_one_contiguous_run(specs, world_size):
    stacks, layouts, places = layouts_for(specs, world_size)
    assert len(places) == sum(k for k, _ in specs)
    for (_, stack), layout in zip(stacks, layouts):
        K = len(stack)
        if world_size == 1:
            assert all(places[p] == Replicated() for p in stack) and layout.slots == tuple(range(K))
            continue
        owners = [places[p].owner for p in stack]
        counts = [owners.count(r) for r in range(world_size)]
        assert set(counts) <= {K // world_size, -(-K // world_size)} and sum(counts) == K
        assert owners == sorted(owners)  # contiguous runs in rank order
        # no more padding than an even split: chunk = ceil(K/N)
        assert layout.chunk == math.ceil(K / world_size)
        # rank r's matrices fill [r·chunk, r·chunk + count_r) of the packed buffer, in order
        for r in range(world_size):
            mine = [slot for slot, o in zip(layout.slots, owners) if o == r]
            assert mine == list(range(r * layout.chunk, r * layout.chunk + counts[r]))


@given(specs=stack_specs, world_size=world_sizes)
def test_cost_balanced_owners_never_load_a_rank_more_than_the_count_split(specs, world_size):
    """The count-based split (matrix i → rank i // ceil(K/N)) loads rank 0 with Σ ceil(K/N)·cost;
    the cost-balanced owners never exceed it, and every rank's load is accounted for."""
    _, layouts, places = layouts_for(specs, world_size)
    loads = owner_loads(layouts, places, world_size)
    by_count_rank0 = sum(math.ceil(len(lay.params) / world_size) * lay.cost for lay in layouts)
    assert max(loads) <= by_count_rank0
    assert sum(loads) == sum(len(lay.params) * lay.cost for lay in layouts)  # each matrix on one rank


def test_remainders_of_different_stacks_go_to_different_ranks():
    # one 768x3072 matrix (cost 3 units) and one 768x768 (1 unit) at N = 2: the count split put
    # both on rank 0 (loads 4 : 0, balance 2.0); by cost they land on ranks 0 and 1 (3 : 1, 1.5)
    _, layouts, places = layouts_for([(1, (768, 3072)), (1, (768, 768))], 2)
    assert [places[lay.params[0]] for lay in layouts] == [Owned(0), Owned(1)]
    loads = owner_loads(layouts, places, 2)
    assert loads[0] == 3 * loads[1]
    assert max(loads) / (sum(loads) / 2) == 1.5


def test_owner_counts_by_hand():
    # the stats case of tests/dist: 8 matrices of cost 2560 and 5 of cost 3584 (per step unit).
    # The dearer stack goes first: its K mod N extras to the lowest ranks; the cheaper stack's
    # extras then to the least-loaded ranks.
    stacks = [(8, 2560), (5, 3584)]
    assert owner_counts(stacks, 1) == [[8], [5]]
    assert owner_counts(stacks, 2) == [[4, 4], [3, 2]]
    assert owner_counts(stacks, 3) == [[3, 2, 3], [2, 2, 1]]
    assert owner_counts(stacks, 4) == [[2, 2, 2, 2], [2, 1, 1, 1]]  # the count split: [2, 2, 1, 0]
    assert owner_counts([(2, 1)], 5) == [[1, 1, 0, 0, 0]]  # K < N


# ---- row_placements (AdamW) ----------------------------------------------------------------

PARAM_SHAPES = [(), (1,), (7,), (1, 1), (3, 4), (2, 600), (1500,), (64, 32), (5, 0)]


@given(shapes=st.lists(st.sampled_from(PARAM_SHAPES), min_size=1, max_size=8), world_size=world_sizes,
       shard_min_numel=st.sampled_from([0, 1, 2, 12, 1024, 10**6]))
def test_row_placements_shard_large_params_by_rows_and_replicate_the_rest(shapes, world_size, shard_min_numel):
    params = [torch.zeros(s) for s in shapes]
    places = row_placements(params, world_size, shard_min_numel)
    for p in params:
        if world_size > 1 and p.ndim >= 1 and p.numel() >= shard_min_numel:
            assert places[p] == Rows(p.shape[0], chunk_rows(p.shape[0], world_size))
        else:
            assert places[p] == Replicated()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_row_placements_examples(world_size):
    params = {s: torch.zeros(s) for s in [(), (1,), (7,), (2, 600), (1500,), (64, 32)]}
    places = row_placements(list(params.values()), world_size, shard_min_numel=1024)
    assert places[params[(2, 600)]] == Rows(2, 1)            # dim 0 < N for N ≥ 3: ranks 2, 3 hold nothing
    assert places[params[(1500,)]] == Rows(1500, math.ceil(1500 / world_size))
    assert places[params[(64, 32)]] == Rows(64, math.ceil(64 / world_size))
    for s in [(), (1,), (7,)]:  # below the threshold: replicated
        assert places[params[s]] == Replicated()
    # 0-d parameters are replicated whatever the threshold; nothing is sharded at N = 1
    assert row_placements([params[()]], world_size, shard_min_numel=0)[params[()]] == Replicated()
    assert set(row_placements(list(params.values()), 1, shard_min_numel=0).values()) == {Replicated()}
