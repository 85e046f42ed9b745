"""2-rank resume reproduces an uninterrupted run exactly.

Run A trains 6 steps straight. Run B trains the same 6-step schedule but stops after step 3 (a
checkpoint, as if preempted), then a torchrun --resume finishes it (A and B's first part run in
process on the rank pool's 2 ranks). Every logged loss and the
final weights must be bit-identical: the checkpoint restores weights, sharded DistMuon/DistAdamW state,
data position and RNG exactly, and the schedules are pure functions of the step. Gradient clipping is on,
so the rank-averaging clip path is part of the trajectory.

A third run resumes B's step-3 checkpoint on 1 rank (no process group): the sharded optimizer state is
resharded 2 -> 1, and gradient accumulation over 2 micro-batches stands in for the second rank. The
summation order may change, so only agreement to rounding is asserted (measured here: bit-identical, as
halving a gradient is exact in floating point).
"""

import pytest
import torch

from tests.train.common import TINY, check, metrics, run
from tests.train.ranks import case_train
from torch_impl.training.checkpoint import list_checkpoints, load_model

# 512 tokens per step = 4 x 64 on each of 2 ranks, or 2 accumulated micro-batches on 1 rank: the same
# tokens either way, so the 1-rank continuation follows the same trajectory up to rounding
ARGS = [*TINY, "--steps", "6", "--eval-every", "3", "--grad-clip", "1.0", "--total-batch-size", "512"]


def losses(out_dir):
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in metrics(out_dir)
            if r["type"] in ("train", "val")]


@pytest.fixture(scope="module")
def runs(rank_groups, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    a, b, c = root / "straight", root / "interrupted", root / "one_rank"
    # A and B's first part in process on 2 ranks of the rank pool (tests/train/ranks.py); B's resume
    # under torchrun, as a user resumes
    rank_groups(2).run(case_train, [*ARGS, "--out-dir", str(a)])
    rank_groups(2).run(case_train, [*ARGS, "--out-dir", str(b), "--stop-at", "3", "--checkpoint-every", "2"])
    stopped = [s for s, _ in list_checkpoints(b)]
    resumed = check(run([*ARGS, "--out-dir", str(b), "--resume"], ranks=2))
    check(run([*ARGS, "--out-dir", str(c), "--resume", str(b / "checkpoints" / "step_000003")]))
    return a, b, c, stopped, resumed


def test_interrupted_run_stopped_with_checkpoint(runs):
    _, b, _, stopped, resumed = runs
    assert stopped == [2, 3]
    assert "resumed from" in resumed.stdout and "step_000003" in resumed.stdout
    assert [s for s, _ in list_checkpoints(b)] == [2, 3, 6]


def test_resumed_losses_are_bit_identical(runs):
    a, b, _, _, _ = runs
    straight, interrupted = losses(a), losses(b)
    assert [(t, s) for t, s, _ in straight] == [("val", 0), ("train", 1), ("train", 2), ("train", 3), ("val", 3),
                                                ("train", 4), ("train", 5), ("train", 6), ("val", 6)]
    assert interrupted == straight  # exact float equality, val losses included


def test_resumed_weights_are_bit_identical(runs):
    a, b, _, _, _ = runs
    model_a, _, meta_a = load_model(a)
    model_b, _, meta_b = load_model(b)
    assert meta_a["step"] == meta_b["step"] == 6
    for (name, pa), (_, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_resume_on_one_rank_reshards(runs):
    a, _, c, _, _ = runs
    straight = {s: v for t, s, v in losses(a) if t == "train"}
    one_rank = {s: v for t, s, v in losses(c) if t == "train"}
    assert sorted(one_rank) == [4, 5, 6]
    for s in one_rank:
        # 1 rank accumulates the 2 micro-batches where 2 ranks all_reduce them: another fp32
        # summation order (a few ULP of each gradient), grown over ≤ 3 steps; bit-equal here
        # in practice, 1e-4 leaves room for BLAS blocking, far below a wrong-state error (~1e-1)
        assert one_rank[s] == pytest.approx(straight[s], rel=1e-4)
