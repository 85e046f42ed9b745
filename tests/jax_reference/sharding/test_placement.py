"""jax_reference.sharding.placement: who orthogonalizes which matrix in the sharded step (.specs/muon_math.md §12)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jax_reference.sharding.placement import StackLayout, chunk_rows, muon_layouts, ns_cost, owner_counts
from tests.jax_reference.optim.test_muon import examples

# Costs drawn from a few values so that ties (first seen first, lowest index) are exercised.
STACKS = st.lists(st.tuples(st.integers(1, 13), st.sampled_from([1, 7, 30, 30, 100])), min_size=1, max_size=6)
DEVICES = st.integers(1, 8)


def loads(stacks, counts):
    n = len(counts[0])
    return [sum(c[r] * cost for c, (_, cost) in zip(counts, stacks)) for r in range(n)]


@pytest.mark.parametrize("rows, n, c", [(8, 4, 2), (5, 4, 2), (5, 3, 2), (2, 4, 1), (1, 4, 1), (32, 1, 32), (0, 4, 1)])
def test_chunk_rows(rows, n, c):
    assert chunk_rows(rows, n) == c
    # The shards [r·c, min((r+1)·c, rows)) cover the rows once, the last ones possibly empty.
    sizes = [max(0, min((r + 1) * c, rows) - r * c) for r in range(n)]
    assert sum(sizes) == rows and all(0 <= s <= c for s in sizes)


def test_ns_cost():
    assert ns_cost((4, 8)) == 5 * 4 * 4 * (2 * 8 + 4)  # wide: s = 4, l = 8
    assert ns_cost((8, 4)) == ns_cost((4, 8))  # tall runs transposed: same cost
    assert ns_cost((6, 2, 3), steps=2) == 2 * 6 * 6 * (2 * 6 + 6)  # the (6, 6) matrix view
    assert ns_cost((32, 1), steps=1) == 1 * 1 * (64 + 1)


def test_owner_counts_by_hand():
    # N = 4; stacks (K, cost) = (6, 8), (5, 8), (1, 100). Dearest first: (1, 100) goes to device 0
    # (all at 0, lowest index): loads 100 0 0 0. (6, 8) before (5, 8) (tie, first seen): 1 each
    # (108 8 8 8), 2 extras to devices 1, 2 (least loaded, lowest index): 108 16 16 8. (5, 8): 1 each
    # (116 24 24 16), 1 extra to device 3. Device 0 ends up with fewer of the cheap matrices.
    assert owner_counts([(6, 8), (5, 8), (1, 100)], 4) == [[1, 2, 2, 1], [1, 1, 1, 2], [1, 0, 0, 0]]
    # N = 2; (3, 10), (2, 30), (5, 1): (2, 30) 1 each (30 30); (3, 10) 1 each and the extra to
    # device 0 (tie) (50 40); (5, 1) 2 each and the extra to device 1 (52 43).
    assert owner_counts([(3, 10), (2, 30), (5, 1)], 2) == [[2, 1], [1, 1], [2, 3]]


@examples()
@given(stacks=STACKS, n=DEVICES)
def test_owner_counts_properties(stacks, n):
    counts = owner_counts(stacks, n)
    assert owner_counts(stacks, n) == counts  # deterministic
    for (K, _), c in zip(stacks, counts):
        assert len(c) == n and sum(c) == K
        assert set(c) <= {K // n, -(-K // n)}  # floor or ceil of K/N
    load = loads(stacks, counts)
    # No device carries more than device 0 of the count split (every stack's extras on the lowest ranks).
    assert max(load) <= sum(-(-K // n) * cost for K, cost in stacks)
    # LPT's balance: the spread never exceeds one matrix of the dearest stack.
    assert max(load) - min(load) <= max(cost for _, cost in stacks)


def test_the_balance_property_can_fail():
    # The count split (extras always to the lowest devices) breaks the spread bound the test above
    # asserts: three stacks of 5 at cost 10, N = 2 puts all three extras on device 0 (spread 30).
    stacks = [(5, 10)] * 3
    count_split = [[3, 2]] * 3
    load = loads(stacks, count_split)
    assert max(load) - min(load) > max(cost for _, cost in stacks)
    assert loads(stacks, owner_counts(stacks, 2)) == [80, 70]


def test_stack_layout():
    layout = StackLayout((2, 1, 0, 2))
    assert (layout.n_devices, layout.chunk, layout.n_slots) == (4, 2, 8)
    assert layout.starts == (0, 2, 3, 3)
    assert layout.owners == (0, 0, 1, 3, 3)
    # device r's matrices at slots [r·chunk, r·chunk + counts[r])
    assert layout.slots == (0, 1, 2, 6, 7)


@examples(0.5)
@given(shapes=st.lists(st.sampled_from([(5, 8), (2, 8), (32, 1), (6, 2, 3)]), min_size=1, max_size=10), n=DEVICES)
def test_muon_layouts_one_per_shape(shapes, n):
    layouts = muon_layouts(shapes, n)
    assert list(layouts) == list(dict.fromkeys(shapes))  # first seen first
    for shape, layout in layouts.items():
        assert sum(layout.counts) == shapes.count(shape) and layout.n_devices == n
        assert sorted(layout.slots) == list(layout.slots) and len(set(layout.slots)) == len(layout.slots)
        assert all(s // layout.chunk == r for s, r in zip(layout.slots, layout.owners))
    stacks = [(shapes.count(s), ns_cost(s)) for s in layouts]
    assert [list(lay.counts) for lay in layouts.values()] == owner_counts(stacks, n)
