"""torch_impl.sharding.comm: the one agreement helper (any_rank) and where collective tensors live.

Every rank-agreement of the package goes through `any_rank` (a structure test holds the code to
calling collectives only in comm.py): the checkpoint save's failure flag, the optimizer
checkpoint's, the preemption signal, the locked out-dir and the optimizers' gradient flags. Each
places its flags on `collective_device(group)`.

What NCCL does to a CPU tensor, a gloo group created as "cuda:gloo" does too on this CPU machine:
it has no CPU backend, so a CPU tensor in any collective fails with "No backend type associated
with device type cpu" (the signature of the checkpoint bug this module's helper fixed). Under such
a group every agreement path must instead go for CUDA: without a GPU that is the error of asking
torch for the current CUDA device; with one it is a collective that completes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import AdamW
from torch_impl.sharding.comm import Comm, any_rank, barrier, collective_device, reduce_

CPU_TENSOR_IN_CUDA_GROUP = "No backend type associated with device type cpu"
NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "no CUDA GPUs are available")


def test_without_a_process_group_everything_is_local():
    assert collective_device() == torch.device("cpu")
    assert any_rank([0, 1, 7]) == [0, 1, 7]
    assert any_rank(torch.tensor([1, 0], dtype=torch.int32)) == [1, 0]
    t = torch.tensor([2.0])
    assert reduce_(t) is t and t.item() == 2.0
    barrier()  # no-op
    assert Comm.local().device == torch.device("cpu") and Comm.local().any_rank([3]) == [3]


def case_any_rank_takes_the_elementwise_max():
    r, n = rank(), world_size()
    got = any_rank([r == n - 1, r, 5 - r])  # only the last rank raises flag 0
    stats = Comm(None, track_stats=True)
    stats.any_rank(torch.tensor([r], dtype=torch.int32))
    ok = got == [1, n - 1, 5] and collective_device() == torch.device("cpu")
    ok &= stats.stats.calls == {"all_reduce": 1}  # counted where the optimizers' flags were counted
    all_ranks_agree(ok, f"any_rank gave {got}")


def test_any_rank_takes_the_elementwise_max(rank_groups):
    rank_groups(3).run(case_any_rank_takes_the_elementwise_max)


def agreement_paths(tmp: str) -> dict:
    """Each of the package's agreement sites, called as the code calls it."""
    from pathlib import Path

    from torch_impl.sharding.checks import grad_flags
    from torch_impl.sharding.optimizer_checkpoint import _agree
    from torch_impl.training.checkpoint import _agree_saved
    from torch_impl.training.preemption import StopSignals

    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.ones(2, 2)
    return {
        "any_rank": lambda: any_rank([1]),
        "barrier": barrier,
        "checkpoint save": lambda: _agree_saved(None, Path(tmp) / ".tmp-x", Path(tmp) / "x", rank()),
        "optimizer checkpoint": lambda: _agree(True, None),
        "preemption": lambda: StopSignals().agreed(False),
        "gradient flags": lambda: grad_flags(Comm(None), [{"params": [p]}], check_finite=True),
        "optimizer construction": lambda: AdamW([torch.nn.Parameter(torch.zeros(4, 4))],
                                                process_group=dist.group.WORLD),
    }


def case_agreements_under_a_cuda_only_group(tmp: str) -> tuple[dict, str]:
    """Each path's outcome on this rank, and the control's (no collective assertion here: the group
    takes no CPU tensor, and each path fails before it communicates)."""
    outcomes = {}
    for name, call in agreement_paths(tmp).items():
        try:
            call()
            outcomes[name] = "completed"
        except (AssertionError, RuntimeError) as e:
            outcomes[name] = str(e).splitlines()[0]
    try:  # the control: a CPU tensor in this group fails, as it would under NCCL
        dist.all_reduce(torch.zeros(1))
        control = "completed"
    except RuntimeError as e:
        control = str(e)
    return outcomes, control


def test_every_agreement_uses_the_collectives_device(rank_groups, tmp_path):
    """Under a CUDA-only group (as NCCL is) every agreement path places its flags on CUDA: with a
    GPU they complete; on this CPU machine each fails asking for the CUDA device, and none with
    the CPU-tensor error that a flag built on the CPU (the old checkpoint save) produces."""
    for outcomes, control in rank_groups(2, "cuda:gloo").run(case_agreements_under_a_cuda_only_group, str(tmp_path)):
        assert CPU_TENSOR_IN_CUDA_GROUP in control  # the group really refuses CPU tensors
        assert len(outcomes) == 7
        for name, outcome in outcomes.items():
            if torch.cuda.is_available():
                assert outcome == "completed", (name, outcome)
            else:
                assert any(k in outcome for k in NO_CUDA), (name, outcome)


def case_collective_device_follows_the_group():
    cuda_only = dist.new_group(backend="cuda:gloo")
    try:
        collective_device(cuda_only)
        where = "cuda"
    except (AssertionError, RuntimeError) as e:
        where = "cuda" if any(k in str(e) for k in NO_CUDA) else str(e)
    ok = collective_device() == torch.device("cpu") and where == "cuda"
    ok &= Comm(None).device == torch.device("cpu")
    all_ranks_agree(ok, f"default gloo group -> {collective_device()}, cuda:gloo group -> {where}")


def test_collective_device_is_read_from_the_groups_backends(rank_groups):
    rank_groups(2).run(case_collective_device_follows_the_group)


@pytest.mark.parametrize("op,want", [(dist.ReduceOp.SUM, [1.0, 2.0]), (dist.ReduceOp.AVG, [0.5, 1.0])])
def test_reduce_returns_the_tensor_it_was_given(rank_groups, op, want):
    rank_groups(2).run(case_reduce, op, want)


def case_reduce(op, want):
    t = torch.tensor([float(rank()), 2.0 * rank()], dtype=torch.float64)
    out = reduce_(t, op)
    all_ranks_agree(out is t and t.tolist() == want, f"reduce_ gave {t.tolist()}")
