"""The default multi-GPU configuration, end to end: several ranks, --sharding zero2, gradient
accumulation > 1 and no --grad-clip, so every rank reduce_scatters its gradients during the
last micro-batch's backward (torch_impl/sharding/backward_reduce.py) and drops the full ones. The same
with --sharding fsdp (FSDP2 reduces in backward by itself). Each must follow the one-rank run
of the same global batch step by step: the loader gives rank r of N chunk s·N + r of the token
stream, so 2 ranks × 2 micro-batches read the chunks 1 rank × 4 micro-batches reads.

The trainer runs in process on the ranks of the session's rank pool (tests/train/ranks.py)."""

import pytest

from tests.train.common import TINY
from tests.train.ranks import case_train

STEPS = 6
# 256 tokens per micro-batch per rank (TINY: 4 × 64): 1,024 tokens per step is 2 ranks × 2
# micro-batches, or 1 rank × 4. No --grad-clip: the default, and the one that reduces in backward.
ARGS = [*TINY, "--steps", str(STEPS), "--eval-every", "3", "--total-batch-size", "1024", "--momentum-warmup-steps", "3"]


@pytest.fixture(scope="module")
def one_rank(rank_groups, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    return rank_groups(1).run(case_train, [*ARGS, "--out-dir", str(out)])[0]


@pytest.mark.parametrize("sharding", ["zero2", "fsdp"])
def test_two_ranks_with_accumulation_follow_the_one_rank_run(rank_groups, tmp_path, one_rank, sharding):
    two = rank_groups(2).run(case_train, [*ARGS, "--sharding", sharding, "--out-dir", str(tmp_path)])[0]
    assert [(kind, step) for kind, step, _ in two] == [(kind, step) for kind, step, _ in one_rank]
    assert len(two) == STEPS + 3  # every step's loss and the val losses at steps 0, 3 and 6
    for (kind, step, a), (_, _, b) in zip(two, one_rank):
        # The same averaged gradient in another fp32 summation order (1 rank accumulates 4
        # micro-batches; 2 ranks accumulate 2 and average over ranks in the reduce_scatter): a few
        # ULP per gradient element, grown over 6 steps. Measured worst 9e-9 relative (zero2) and
        # 1.1e-7 (fsdp: one fp32 ULP of a loss near 4); 1e-5 is ~100 ULP, far below the ~1e-1 a
        # sum over ranks instead of the mean makes at step 2.
        assert a == pytest.approx(b, rel=1e-5), (sharding, kind, step)
