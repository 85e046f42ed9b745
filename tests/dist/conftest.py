"""One pool of 4 spawned worker processes for all of tests/dist: `rank_groups(n)` gives a
gloo group of size n on its first n workers (re-formed in ~0.5 s when n changes; spawning
costs ~4 s of CPU per process for `import torch`, so it is paid once)."""

import pytest

from tests.dist.harness import RankGroup, RankPool


@pytest.fixture(scope="session")
def rank_groups():
    pool = RankPool(4)
    yield lambda n: RankGroup(pool, n)
    pool.close()
