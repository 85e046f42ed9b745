"""Training with --sharding fsdp (FSDP2, every parameter split by rows over 2 ranks) and
--activation-checkpointing: the trainer in process on 2 ranks of the rank pool (torchrun itself is
exercised by test_resume.py, test_reliability.py and test_launch.py).

Run F trains 6 steps straight; run G stops after step 3 and a second run with --resume finishes
it: losses (val included) and final weights must be bit-identical, as for the ZeRO-2 runs of
test_resume.py (the DCP model checkpoint holds FSDP2's row shards). The same schedule under
--sharding zero2 (run Z) follows the same trajectory: both average the two ranks' gradients
and run the same optimizer math, only the collectives differ. G's step-3 checkpoint also
resumes on one process without FSDP, a subprocess with no process group (DCP reads the row
shards back into whole tensors).
"""

import pytest
import torch

from tests.train.common import TINY, check, metrics, run
from tests.train.ranks import case_train
from torch_impl.training.checkpoint import load_model

ARGS = [*TINY, "--steps", "6", "--eval-every", "3", "--grad-clip", "1.0", "--total-batch-size", "512"]
FSDP = ["--sharding", "fsdp", "--activation-checkpointing"]


def losses(out_dir, kind=("train", "val")):
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in metrics(out_dir) if r["type"] in kind]


@pytest.fixture(scope="module")
def runs(rank_groups, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    f, g, z, one = root / "fsdp", root / "fsdp_interrupted", root / "zero2", root / "one_rank"
    two = rank_groups(2)  # the trainer in process on 2 ranks (tests/train/ranks.py): no torchrun start-up
    two.run(case_train, [*ARGS, *FSDP, "--out-dir", str(f)])
    two.run(case_train, [*ARGS, *FSDP, "--out-dir", str(g), "--stop-at", "3"])
    two.run(case_train, [*ARGS, *FSDP, "--out-dir", str(g), "--resume"])
    two.run(case_train, [*ARGS, "--out-dir", str(z)])
    # one process and no process group at all, as `python -m torch_impl.train` runs
    check(run([*ARGS, "--out-dir", str(one), "--resume", str(g / "checkpoints" / "step_000003")]))
    return f, g, z, one


def test_fsdp_resume_is_bit_identical(runs):
    f, g, _, _ = runs
    assert len(losses(f)) == 9 and losses(g) == losses(f)  # exact float equality
    model_f, _, _ = load_model(f)
    model_g, _, _ = load_model(g)
    for (name, a), (_, b) in zip(model_f.state_dict().items(), model_g.state_dict().items()):
        assert torch.equal(a, b), name


def test_fsdp_follows_the_zero2_trajectory(runs):
    f, _, z, _ = runs
    for (kind, step, a), (_, _, b) in zip(losses(f), losses(z), strict=True):
        # the same averaged gradients and the same optimizer math; the reductions differ (FSDP's
        # reduce_scatter of each block vs the optimizer's of each stack) but average 2 values,
        # exact either way; the clip's norm sums squares in another grouping (~1 ULP of the
        # norm). 1e-4 relative over 6 steps leaves room for that and is far below the ~1e-1
        # gap a misrouted or mis-sharded update makes
        assert a == pytest.approx(b, rel=1e-4), (kind, step)


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    f, _, _, one = runs
    straight = {s: v for _, s, v in losses(f, ("train",))}
    resumed = {s: v for _, s, v in losses(one, ("train",))}
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        # 1 process accumulates the 2 micro-batches where FSDP reduce_scatters them: another
        # fp32 summation order, as in test_resume.py's 2 -> 1 resume
        assert resumed[s] == pytest.approx(straight[s], rel=1e-4)
