"""AdamW on FSDP2 parameters (DTensors sharded by rows, Shard(0)) in 1–4 spawned gloo ranks.

Each rank updates its rows of each parameter with the gradient FSDP reduced, no collective of
the optimizer's own. Gradients here are placed with `distribute_tensor` (exact: the full
gradient, split by rows), so the result must equal single-device AdamW bit for bit, state
included, for dims 0 that N divides, does not divide, and that are smaller than N. A real
`fully_shard` model checks that its parameters are what the optimizer expects. Muon on such
parameters is not supported yet and must say so on every rank.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.common import clone_params, exact_randn, make_params
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import AdamW, DistAdamW, DistMuon
from torch_impl.placement import ShardedRows

F32, BF16 = torch.float32, torch.bfloat16
# 5 rows: N = 2, 3, 4 do not divide; (1, 8) and (3, 4): fewer rows than ranks; bf16 and 1-D too
SPECS = [((5, 16), F32), ((1, 8), F32), ((40, 32), BF16), ((7,), F32), ((3, 4), F32), ((8, 8), F32)]
KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world_size(),))


def as_fsdp2(params, device_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    return [torch.nn.Parameter(distribute_tensor(p.detach().clone(), device_mesh, [Shard(0)])) for p in params]


def case_adamw_on_fsdp2_equals_single_device(steps):
    from torch.distributed.tensor import Shard, distribute_tensor
    m = mesh()
    full = make_params(SPECS)
    ref = clone_params(full)
    params = as_fsdp2(full, m)
    opt, ref_opt = DistAdamW(params, **KW, track_stats=True), AdamW(ref, **KW)
    for t in range(steps):
        for i, (p, q) in enumerate(zip(params, ref)):
            g = exact_randn(q.shape, 21, t, i, dtype=q.dtype)
            q.grad = g.clone()
            p.grad = distribute_tensor(g, m, [Shard(0)])
        opt.step()
        ref_opt.step()
    ok = all(torch.equal(p.full_tensor(), q) for p, q in zip(params, ref))
    for p, q in zip(params, ref):
        place = opt.placement(p)
        ok &= isinstance(place, ShardedRows)
        start, end = place.local_rows(rank())
        if end > start:  # this rank's rows of the state, and the step count
            s, r = opt.state[p], ref_opt.state[q]
            ok &= torch.equal(s["step"], r["step"])
            ok &= all(torch.equal(s[k], r[k][start:end]) for k in ("exp_avg", "exp_avg_sq"))
        else:  # owns no rows: no state at all
            ok &= p not in opt.state
    # no collective of the optimizer's own beyond the one flag all_reduce of each step
    ok &= set(opt.stats.calls) <= {"all_reduce"} and opt.stats.calls.get("all_reduce", 0) == (
        steps if world_size() > 1 else 0)
    all_ranks_agree(ok, "AdamW on FSDP2 DTensors != single-device AdamW bitwise")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_adamw_on_fsdp2_parameters_equals_single_device_bitwise(rank_groups, n):
    rank_groups(n).run(case_adamw_on_fsdp2_equals_single_device, 3)


def case_fully_shard_model_gives_sharded_rows():
    """What fully_shard produces is what the optimizer expects: every parameter ShardedRows
    with FSDP's own local rows."""
    from torch.distributed.fsdp import fully_shard
    m = mesh()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 5), torch.nn.Linear(5, 1, bias=False))
    for layer in model:
        fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)
    opt = DistAdamW(model.parameters(), **KW)
    ok = True
    for p in model.parameters():
        place = opt.placement(p)
        start, end = place.local_rows(rank())
        ok &= isinstance(place, ShardedRows) and p.to_local().shape[0] == end - start
    all_ranks_agree(ok, "fully_shard parameters are not the ShardedRows the optimizer computed")


@pytest.mark.parametrize("n", [2, 3])
def test_fully_shard_parameters_are_sharded_rows(rank_groups, n):
    rank_groups(n).run(case_fully_shard_model_gives_sharded_rows)


def raises_everywhere(fn, match: str) -> None:
    try:
        fn()
    except ValueError as e:
        all_ranks_agree(match in str(e), f"wrong message: {e}")
        return
    all_ranks_agree(False, "did not raise ValueError on this rank")


def case_unsupported_layouts_raise_everywhere():
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    m = mesh()
    sharded = as_fsdp2(make_params([((8, 8), F32)]), m)
    raises_everywhere(lambda: DistMuon(sharded), "not supported yet")
    plain = make_params([((8, 8), F32)])
    raises_everywhere(lambda: DistAdamW(sharded + plain), "mixed with 1 plain")
    by_cols = [torch.nn.Parameter(distribute_tensor(torch.zeros(8, 8), m, [Shard(1)]))]
    raises_everywhere(lambda: DistAdamW(by_cols), "only Shard(0)")
    replicated = [torch.nn.Parameter(distribute_tensor(torch.zeros(8, 8), m, [Replicate()]))]
    raises_everywhere(lambda: DistAdamW(replicated), "only Shard(0)")
    raises_everywhere(lambda: AdamW(sharded), "mesh of 2 ranks")  # a local optimizer: world size 1


def test_unsupported_layouts_raise_on_every_rank(rank_groups):
    rank_groups(2).run(case_unsupported_layouts_raise_everywhere)


# ---- checkpoints: saved sharded at N ranks, loaded whole without a process group -------------

def fsdp2_steps(params, opt, steps_range, device_mesh=None):
    from torch.distributed.tensor import Shard, distribute_tensor
    for t in steps_range:
        for i, p in enumerate(params):
            g = exact_randn(tuple(p.shape), 23, t, i, dtype=p.dtype)
            p.grad = g if device_mesh is None else distribute_tensor(g, device_mesh, [Shard(0)])
        opt.step()


def case_save_fsdp2(path, steps):
    from torch_impl.opt_checkpoint import consolidated_state, save_optimizer
    m = mesh()
    params = as_fsdp2(make_params(SPECS), m)
    opt = DistAdamW(params, **KW)
    fsdp2_steps(params, opt, range(steps), m)
    save_optimizer(opt, path)
    full = consolidated_state(opt)
    ref = make_params(SPECS)
    ref_opt = AdamW(ref, **KW)
    fsdp2_steps(ref, ref_opt, range(steps))
    want = consolidated_state(ref_opt)
    same = full.keys() == want.keys() and all(torch.equal(full[k], want[k]) for k in want)
    all_ranks_agree(rank() != 0 or same, "consolidated FSDP2 AdamW state != single-device state")
    return [p.full_tensor().detach() for p in params]


@pytest.mark.parametrize("n", [2, 3])
def test_checkpoint_saved_on_fsdp2_resumes_on_one_process(rank_groups, tmp_path, n):
    from torch_impl.opt_checkpoint import load_optimizer
    path = str(tmp_path / "opt")
    saved = rank_groups(n).run(case_save_fsdp2, path, 2)[0]
    params = [torch.nn.Parameter(t.clone()) for t in saved]
    opt = AdamW(params, **KW)
    load_optimizer(opt, path)  # here, without any process group
    fsdp2_steps(params, opt, range(2, 4))
    ref = make_params(SPECS)
    ref_opt = AdamW(ref, **KW)
    fsdp2_steps(ref, ref_opt, range(4))
    assert all(torch.equal(p, q) for p, q in zip(params, ref))
