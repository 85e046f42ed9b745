"""The owner rule is written twice: torch_impl.sharding.placement (which rank orthogonalizes each
matrix of a Muon stack, and where it sits in the packed buffer the collectives move) and
jax_reference.sharding.placement (which device does, in the shard_map). Both implement
.specs/muon_math.md §12's longest-processing-time rule, and the sharded steps of the two
frameworks are only comparable if they agree: the same counts per rank for any stacks, and the
same owners and buffer slots for any list of parameter shapes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from jax_reference.sharding import placement as J
from torch_impl.sharding import placement as T

STACKS = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 10**7)), min_size=1, max_size=6)
WORLD = st.integers(1, 8)
SHAPES = st.lists(st.sampled_from([(8, 8), (16, 8), (8, 16), (32, 8), (4, 2, 3), (24, 24)]), min_size=1, max_size=12)


@given(stacks=STACKS, n=WORLD)
def test_owner_counts_agree(stacks, n):
    counts = T.owner_counts(stacks, n)
    assert counts == J.owner_counts(stacks, n)
    for (size, _), per_rank in zip(stacks, counts):  # and the rule itself: ⌊K/N⌋ or ⌈K/N⌉ each
        assert sum(per_rank) == size and set(per_rank) <= {size // n, -(-size // n)}


@given(shapes=SHAPES, n=WORLD, steps=st.sampled_from([4, 5, 10]))
def test_layouts_of_a_parameter_list_agree(shapes, n, steps):
    params = [torch.zeros(s) for s in shapes]
    stacks = [(0, stack) for stack in T.same_shape_stacks(params)]
    layouts, placements = T.muon_layouts(stacks, n, [steps])
    jax_layouts = J.muon_layouts(shapes, n, steps)
    assert [tuple(layout.params[0].shape) for layout in layouts] == list(jax_layouts)  # first seen first
    for layout in layouts:
        theirs = jax_layouts[tuple(layout.params[0].shape)]
        assert layout.chunk == theirs.chunk
        assert tuple(layout.slots) == theirs.slots
        assert layout.owners() == list(theirs.owners)
        if n > 1:
            assert [placements[p].owner for p in layout.params] == list(theirs.owners)
    assert T.ns_cost((8, 2, 3), steps) == J.ns_cost((8, 2, 3), steps)  # N-D as (rows, prod(rest)) on both sides
